"""Command line for checkpoint conversion.

  python -m t5x_adapt.convert hf-to-orbax HF_DIR CKPT_DIR [--unrolled]
      [--text_only]
  python -m t5x_adapt.convert gguf-to-orbax FILE.gguf CKPT_DIR [--unrolled]
  python -m t5x_adapt.convert gemma-to-orbax GEMMA_CKPT CKPT_DIR [--preset P]
      [--vocab_size N] [--unrolled]
  python -m t5x_adapt.convert orbax-to-hf CKPT_DIR HF_DIR
  python -m t5x_adapt.convert tokenizer FILE.gguf OUT.model

Orbax checkpoints written here carry the model config in their metadata, so
`orbax-to-hf` needs nothing else. The gemma library's checkpoints (Kaggle's
Flax releases) carry none: `gemma-to-orbax` reads one as the model of
`--preset` (a name in gin/models/), or of the preset whose tensors it has
(`gemma_lib.find_preset`); `--vocab_size` keeps a padded table's rows
(Gemma 2: 256128), which the presets trim to the 256000 used.
"""

import argparse
import sys

from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt.checkpoints import errors
from t5x_adapt.config import config_to_dict
from t5x_adapt.convert import gemma_lib
from t5x_adapt.convert import load
from t5x_adapt.convert.gguf_tokenizer import gguf_tokenizer
from t5x_adapt.convert.hf import save_hf


def _save_orbax(model, params, out):
  path = checkpoints.save_params(
      out, params, metadata={'config': config_to_dict(model.config)})
  print(f'wrote {path}')


def _to_orbax(args):
  _save_orbax(*load.model_and_params(
      args.src, scan_layers=not args.unrolled,
      text_only=getattr(args, 'text_only', False)), args.out)


def _gemma_to_orbax(args):
  preset = args.preset or gemma_lib.find_preset(gemma_lib.Checkpoint(args.src))
  overrides = {'scan_layers': not args.unrolled}
  if args.vocab_size:
    overrides['vocab_size'] = args.vocab_size
  model = gin_utils.load_model(preset, **overrides)
  print(f'reading {args.src} as {preset}')
  _save_orbax(model, load.load_params(args.src, model), args.out)


def _orbax_to_hf(args):
  print(f'wrote {save_hf(*load.model_and_params(args.src), args.out)}')


def _tokenizer(args):
  print(f'wrote {gguf_tokenizer(args.src, args.out)}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m t5x_adapt.convert',
      description='Convert between transformers, GGUF, gemma library and '
      'Orbax checkpoints.')
  commands = parser.add_subparsers(dest='command', required=True)
  for name, fn, help_text in (
      ('hf-to-orbax', _to_orbax, 'transformers directory -> Orbax'),
      ('gguf-to-orbax', _to_orbax, 'Gemma 3 GGUF file -> Orbax'),
      ('gemma-to-orbax', _gemma_to_orbax,
       'gemma library (Kaggle Flax) checkpoint -> Orbax'),
      ('orbax-to-hf', _orbax_to_hf, 'Orbax -> transformers directory'),
      ('tokenizer', _tokenizer, 'GGUF tokenizer -> SentencePiece model')):
    command = commands.add_parser(name, help=help_text)
    command.add_argument('src')
    command.add_argument('out')
    if name.endswith('to-orbax'):
      command.add_argument('--unrolled', action='store_true',
                           help='store unrolled (per-layer) parameters')
    if name == 'gemma-to-orbax':
      command.add_argument('--preset', help='the model preset (default: '
                           'the one whose tensors the checkpoint has)')
      command.add_argument('--vocab_size', type=int,
                           help='rows of the table to keep (default: the '
                           "preset's vocabulary)")
    if name == 'hf-to-orbax':
      command.add_argument('--text_only', action='store_true',
                           help="read a T5Gemma 2 checkpoint's text model, "
                           'leaving its vision tower')
    command.set_defaults(fn=fn)
  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except (errors.CheckpointError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
