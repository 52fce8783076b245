"""Checkpoint interop: transformers (import and export) and GGUF (import).

  load_hf(path) -> (model, params)
  save_hf(model, params, path)
  load_gguf(path) -> (model, params)
  gguf_tokenizer(gguf_path, out_path) -> SentencePiece model path
"""

from t5x_adapt.checkpoints.errors import CheckpointError
from t5x_adapt.checkpoints.errors import CorruptCheckpointError
from t5x_adapt.checkpoints.errors import MissingTensorError
from t5x_adapt.checkpoints.errors import ShapeMismatchError
from t5x_adapt.checkpoints.errors import UnexpectedTensorError
from t5x_adapt.checkpoints.errors import UnsupportedArchitectureError
from t5x_adapt.convert.gguf_tokenizer import gguf_tokenizer
from t5x_adapt.convert.hf import load_hf
from t5x_adapt.convert.hf import save_hf
from t5x_adapt.convert.gguf import load_gguf
