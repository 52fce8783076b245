"""Every model preset's parameter count and the time to build it.

Per preset under gin/models/: its kind, its parameters (from
`param_shapes()`: traced, nothing allocated, so the 27B and 9B-9B presets
are cheap), the published figure where there is one (the figures
tests/test_presets.py asserts against; `*`: the T5Gemma paper's, not
asserted) and the seconds `load_model` + `param_shapes` took. Decoder-only
presets first, then encoder-decoders, each by size.

  .venv/bin/python benchmarks/presets.py    # ~1 minute on CPU
"""

from __future__ import annotations

import math
import sys
import time

import common  # puts the repository on sys.path

# pylint: disable=g-import-not-at-top,g-bad-import-order
import jax

from t5x_adapt import gin_utils

sys.path.insert(0, str(common.REPO_ROOT / 'tests'))
import test_presets  # the published figures
# pylint: enable=g-import-not-at-top,g-bad-import-order


def _human(count: float) -> str:
  if count >= 1e9:
    return f'{count / 1e9:.3f}B'
  if count >= 1e6:
    return f'{count / 1e6:.1f}M'
  return f'{count / 1e3:.1f}K'


def _published(preset: str) -> str:
  if preset in test_presets.PUBLISHED:
    return _human(test_presets.PUBLISHED[preset])
  if preset in test_presets.PAPER_ONLY:
    return _human(test_presets.PAPER_ONLY[preset]) + '*'
  return ''


def measure(preset: str) -> tuple[bool, int, float]:
  """(is encoder-decoder, parameters, build seconds) of a preset."""
  start = time.perf_counter()
  model = gin_utils.load_model(preset)
  shapes = model.param_shapes()
  count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(
      shapes))
  return model.is_encoder_decoder, count, time.perf_counter() - start


def main(argv=None) -> None:
  common.argument_parser(__doc__).parse_args(argv)
  measured = {}
  for preset in gin_utils.list_presets():
    common.log(preset)
    measured[preset] = measure(preset)
  rows = [(preset, 'enc-dec' if encdec else 'decoder-only', f'{count:,}',
           _human(count), _published(preset), f'{seconds:.2f}s')
          for preset, (encdec, count, seconds) in sorted(
              measured.items(), key=lambda item: item[1][:2])]
  header = ('preset', 'type', 'parameters', '', 'published', 'build')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(6)]
  for row in [header] + rows:
    print('  '.join(c.rjust(w) if i >= 2 else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths))))
  print('* the T5Gemma paper\'s figure, not asserted (see PAPER_ONLY).')
  total = sum(seconds for _, _, seconds in measured.values())
  print(f'load_model + param_shapes, all presets: {total:.1f}s')


if __name__ == '__main__':
  main()
