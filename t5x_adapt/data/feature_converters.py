"""seqio feature converters with Gemma's BOS as the decoder start token.

seqio shifts targets right to make decoder inputs and puts `bos_id` first;
Gemma-family models (and transformers' T5Gemma) start decoding from BOS = 2,
so these converters use it. Packing is seqio's.
"""

import seqio

from t5x_adapt.data.vocab import BOS_ID


class EncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """Encoder-decoder features; decoder inputs start with BOS."""

  def __init__(self, pack: bool = True, bos_id: int = BOS_ID, **kwargs):
    super().__init__(pack=pack, bos_id=bos_id, **kwargs)


class DecoderFeatureConverter(seqio.DecoderFeatureConverter):
  """Decoder-only features (causal LM, or prefix-LM when `inputs` exist)."""

  def __init__(self, pack: bool = True, bos_id: int = BOS_ID, **kwargs):
    super().__init__(pack=pack, bos_id=bos_id, **kwargs)
