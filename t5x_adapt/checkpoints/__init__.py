"""Checkpoints: parameters (`params`), training state (`training`), errors.

  params.save_params / restore_params / read_info / saved_shapes:
      parameter trees, in either layer layout, restorable onto a mesh
  training.CheckpointManager: MODEL_DIR/checkpoints/<step> (TrainState and
      input position), resume, keep-last / keep-best
  integrity: checksums of every checkpoint's files, written at commit and
      verified before a restore
  embeddings: where a checkpoint keeps its embedding tables and where the
      model does (two-copy checkpoints of a tied model, converted on read)
  errors: what reading or writing a checkpoint raises (also the
      converters': `t5x_adapt.convert` uses these)

The parameter API is re-exported here: `checkpoints.restore_params(...)`.
"""

from t5x_adapt.checkpoints import embeddings
from t5x_adapt.checkpoints import errors
from t5x_adapt.checkpoints import integrity
from t5x_adapt.checkpoints import training
from t5x_adapt.checkpoints.errors import CheckpointError
from t5x_adapt.checkpoints.errors import CheckpointSaveError
from t5x_adapt.checkpoints.errors import CorruptCheckpointError
from t5x_adapt.checkpoints.errors import MissingTensorError
from t5x_adapt.checkpoints.errors import ShapeMismatchError
from t5x_adapt.checkpoints.errors import UnexpectedTensorError
from t5x_adapt.checkpoints.errors import UnsupportedArchitectureError
from t5x_adapt.checkpoints.params import INFO_FILE
from t5x_adapt.checkpoints.params import read_info
from t5x_adapt.checkpoints.params import restore_params
from t5x_adapt.checkpoints.params import save_params
from t5x_adapt.checkpoints.params import saved_shapes
