"""seqio task and mixture registrations (imported for their side effect).

Task names say what they hold and which vocabulary they use:

  corpus_{lm,prefix_lm,ul2,span_corruption}_{spm8k,gemma3}
      Shakespeare + Milton + King James Bible + Botchan.
  sentiment_{spm8k,gemma3}         text-to-text ("positive" / "negative")
  sentiment_cls_{spm8k,gemma3}     classification (inputs + integer label)
  super_glue_{boolq,cb,copa,rte,wic,wsc,multirc}_cls_{spm8k,gemma3}
      TFDS super_glue (needs a download), cast as classification.
  sft_{sentiment,continuation}_{spm8k,gemma3}
      instruction tuning in Gemma's turn template (t5x_adapt/tasks/sft.py).

`spm8k` is the corpus-trained SentencePiece model, `gemma3` Gemma 3's.
"""

from t5x_adapt.tasks import corpus  # pylint: disable=unused-import
from t5x_adapt.tasks import sentiment  # pylint: disable=unused-import
from t5x_adapt.tasks import sft  # pylint: disable=unused-import
from t5x_adapt.tasks import super_glue  # pylint: disable=unused-import
