"""Corpus pretraining tasks: causal LM, PrefixLM, UL2 and T5 span corruption."""

import functools

import seqio

from t5x_adapt.data import objectives
from t5x_adapt.data import sources
from t5x_adapt.data.sources_seqio import PreparedSource, TEXT
from t5x_adapt.tasks import t5_lib
from t5x_adapt.tasks.vocabularies import VOCABULARIES


def source(ensure_vocabulary):
  """The corpus documents (text, id), prepared on first use."""
  return PreparedSource(
      lambda: {split: sources.corpus_pattern(split)
               for split in ('train', 'validation')},
      TEXT, ensure_vocabulary)


def _tokenize_and_chunk(objective):
  return [
      functools.partial(seqio.preprocessors.rekey,
                        key_map={'targets': 'text', 'id': 'id'}),
      seqio.preprocessors.tokenize,
      functools.partial(objectives.split_into_chunks, objective=objective),
  ]


def _register(vocab_name, vocabulary, ensure):
  no_eos = seqio.Feature(vocabulary, add_eos=False)
  with_eos = seqio.Feature(vocabulary, add_eos=True)
  tasks = {
      'lm': ([], {'targets': no_eos}),
      'prefix_lm': ([objectives.prefix_lm_objective],
                    {'inputs': no_eos, 'targets': no_eos}),
      'ul2': ([objectives.ul2_objective,
               seqio.preprocessors.append_eos_after_trim],
              {'inputs': no_eos, 'targets': with_eos}),
  }
  for objective, (steps, features) in tasks.items():
    seqio.TaskRegistry.add(
        f'corpus_{objective}_{vocab_name}', source=source(ensure),
        preprocessors=_tokenize_and_chunk(objective) + steps,
        output_features=features, metric_fns=[])
  seqio.TaskRegistry.add(
      f'corpus_span_corruption_{vocab_name}', source=source(ensure),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={'targets': 'text'}),
          seqio.preprocessors.tokenize,
          t5_lib.span_corruption,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features={'inputs': no_eos, 'targets': with_eos},
      metric_fns=[])


for _name, (_vocabulary, _ensure) in VOCABULARIES.items():
  _register(_name, _vocabulary, _ensure)
