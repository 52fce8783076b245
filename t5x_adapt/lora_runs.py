r"""A LoRA run's adapters: merged into its base, or exported for PEFT.

  python -m t5x_adapt.lora_runs merge MODEL_DIR OUT [--step N] [--hf]
  python -m t5x_adapt.lora_runs export MODEL_DIR OUT [--step N]

A LoRA run (`gin/finetune/lora.gin`) checkpoints its adapters alone; its
MODEL_DIR/lora.json (`write_record`) names the rest: the base model's
config, the LoRA settings and the base checkpoint (`INIT_CHECKPOINT`, or,
when an adaptation built the base, MODEL_DIR/lora_base, written once).
`merge` folds the adapters of a step (default: the latest) into the base
and writes one of our checkpoints (with its config, as `python -m
t5x_adapt.convert` writes them: evaluation, decoding and serving read it),
or with `--hf` a transformers directory (`save_hf`). `export` writes
OUT/base (the base, `save_hf`) and OUT/adapter (a PEFT LoRA directory that
`peft.PeftModel.from_pretrained` loads onto OUT/base).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Optional

import jax

from t5x_adapt import checkpoints
from t5x_adapt import distributed
from t5x_adapt import lora
from t5x_adapt.checkpoints import errors
from t5x_adapt.config import config_from_dict, config_to_dict
from t5x_adapt.convert import hf
from t5x_adapt.convert import load
from t5x_adapt.convert import peft_adapters
from t5x_adapt.models import model_for_config

RECORD_FILE = 'lora.json'
BASE_DIR = 'lora_base'


def write_record(model_dir: pathlib.Path, model: lora.LoraModel,
                 init_checkpoint: Optional[str], base_params) -> None:
  """MODEL_DIR/lora.json: what `read_run` needs besides the adapters. A
  base built by an adaptation (no `init_checkpoint`) is saved once, to
  MODEL_DIR/lora_base. Every process calls this (the save is collective)."""
  base_checkpoint = init_checkpoint
  if base_checkpoint is None:
    base_checkpoint = str(model_dir / BASE_DIR)
    if not pathlib.Path(base_checkpoint).exists():
      checkpoints.save_params(
          base_checkpoint, base_params,
          metadata={'config': config_to_dict(model.base.config)})
  if distributed.is_main_process():
    (model_dir / RECORD_FILE).write_text(json.dumps({
        'base_checkpoint': str(base_checkpoint),
        'config': config_to_dict(model.base.config),
        'lora': dataclasses.asdict(model.lora_config)}, indent=2))


@dataclasses.dataclass
class LoraRun:
  """What a LoRA run's directory describes, read back."""

  model: lora.LoraModel
  base: dict  # Frozen base parameters.
  trained: dict  # Adapters (and `LoraConfig.trained` parameters) of a step.
  step: int

  @property
  def params(self) -> dict:
    """Every parameter of the adapted model (`model.adapted`)."""
    return lora.join(self.base, self.trained)

  def merged(self) -> dict:
    """The base's tree with the adapters folded into its kernels."""
    return lora.merge_adapters(self.params, self.model.lora_config)


def read_run(model_dir: str | pathlib.Path,
             step: Optional[int] = None) -> LoraRun:
  """The model, base and adapters of a LoRA run (`step`: default latest).

  The base model is the plain model of the recorded config (a
  classifier's or a distillation student's base tree is its plain model's
  only for the latter).

  Raises:
    FileNotFoundError: no lora.json (not a LoRA run) or no checkpoint.
  """
  model_dir = pathlib.Path(model_dir)
  record_file = model_dir / RECORD_FILE
  if not record_file.exists():
    raise FileNotFoundError(f'{record_file}: not found (is {model_dir} the '
                            'directory of a LoRA run?)')
  record = errors.read_json(record_file, 'written by a LoRA run')
  model = lora.LoraModel(model_for_config(config_from_dict(record['config'])),
                         lora.LoraConfig(**record['lora']))
  manager = checkpoints.training.CheckpointManager(
      model_dir / checkpoints.training.CHECKPOINT_DIR)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{model_dir}: no checkpoint')
  step_dir = manager.directory / str(step)
  if not step_dir.exists():
    raise FileNotFoundError(f'{step_dir}: no such checkpoint step')
  base = load.load_params(record['base_checkpoint'], model.base)
  trained = load.load_params(step_dir, model)
  return LoraRun(model, model.split(base)[0], trained, step)


def _merge(args) -> None:
  run = read_run(args.model_dir, args.step)
  base_model = run.model.base
  merged = jax.device_get(run.merged())
  if args.hf:
    path = hf.save_hf(base_model, merged, args.out)
  else:
    path = checkpoints.save_params(
        args.out, merged,
        metadata={'config': config_to_dict(base_model.config)})
  print(f'wrote {path} (step {run.step}, adapters merged)')


def _export(args) -> None:
  run = read_run(args.model_dir, args.step)
  out = pathlib.Path(args.out)
  base_dir = hf.save_hf(run.model.base, jax.device_get(run.base), out / 'base')
  adapter_dir = peft_adapters.save_peft(
      run.model.base, jax.device_get(run.trained), run.model.lora_config,
      out / 'adapter', base_model_name_or_path=str(base_dir))
  print(f'wrote {base_dir} and {adapter_dir} (step {run.step})')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m t5x_adapt.lora_runs',
      description="A LoRA run's adapters: merged, or exported for PEFT.")
  commands = parser.add_subparsers(dest='command', required=True)
  for name, fn, help_text in (
      ('merge', _merge, 'adapters folded into the base: our checkpoint '
       '(or --hf: a transformers directory)'),
      ('export', _export, 'OUT/base (transformers) + OUT/adapter (PEFT)')):
    command = commands.add_parser(name, help=help_text)
    command.add_argument('model_dir', help='the LoRA run directory')
    command.add_argument('out')
    command.add_argument('--step', type=int, default=None,
                         help='checkpoint step (default: the latest)')
    if name == 'merge':
      command.add_argument('--hf', action='store_true',
                           help='write a transformers directory')
    command.set_defaults(fn=fn)
  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except (errors.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
