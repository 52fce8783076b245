"""The task registrations' old name, kept in the checkout only.

They live in `t5x_adapt.tasks` (gin files say `import t5x_adapt.tasks`).
`import tasks` and `from tasks import sft` still work inside a checkout and
give the same module objects (seqio would refuse a second registration of
each task). setup.py does not install this package: a top-level `tasks` in
site-packages would take a name any project may use.
"""

import sys

from t5x_adapt.tasks import corpus
from t5x_adapt.tasks import sentiment
from t5x_adapt.tasks import sft
from t5x_adapt.tasks import super_glue
from t5x_adapt.tasks import t5_lib
from t5x_adapt.tasks import vocabularies

for _module in (corpus, sentiment, sft, super_glue, t5_lib, vocabularies):
  sys.modules[f'{__name__}.{_module.__name__.rsplit(".", 1)[1]}'] = _module
