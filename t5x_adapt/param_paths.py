"""Parameter paths as '/'-joined strings, e.g. 'decoder/final_norm/scale'.

What error messages, checkpoint shape listings and the optimizer's regular
expressions (frozen and warm-up parameters) name a parameter by.
"""

from typing import Any

import jax


def path_str(key_path) -> str:
  """A `tree_util` key path as 'a/b/c' (dict keys, sequence indices)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                  for k in key_path)


def param_paths(tree: Any) -> Any:
  """Tree of path strings, shaped like `tree`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path),
                                          tree)
