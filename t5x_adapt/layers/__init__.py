"""The one layer library shared by the encoder, the decoder and the
decoder-only stack. Prefix-LM, bidirectional encoders and sliding windows are
masks (`t5x_adapt/kernels/masks.py`), not separate layer files."""

from t5x_adapt.layers.attention import Attention
from t5x_adapt.layers.blocks import Block
from t5x_adapt.layers.embedding import Embed
from t5x_adapt.kernels.masks import attention_mask
from t5x_adapt.layers.mlp import GatedMLP
from t5x_adapt.layers.norms import RMSNorm
from t5x_adapt.layers.rope import apply_rope
from t5x_adapt.layers.stack import Stack
