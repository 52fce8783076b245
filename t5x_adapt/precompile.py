r"""Compile a training step for a TPU topology ahead of time, on any machine.

  python -m t5x_adapt.precompile \
    --gin_file=gin/adapt/t5gemma_2b_2b_prefixlm_kd.gin --topology=v5p-128

reads the same gin files as `t5x_adapt.train` (a recipe, or a run file plus
a model preset, with any `--gin.NAME=VALUE` overrides), builds the whole
sharded step from abstract shapes only (student, teacher, a LoRA model's
frozen base, optimizer state and batch as ShapeDtypeStructs: nothing is
allocated, no checkpoint or data is read) and compiles it with libtpu for the topology's devices
(`jax.experimental.topologies`; `pip install -e .[tpu]`). It prints, per
chip, the argument / output / temp / total bytes against the chip's HBM, and
the compiled FLOPs next to the analytic count (`t5x_adapt.flops`; XLA's
cost analysis counts the body of a loop once, so with scanned layers the
compiled figure covers one period of them). A step that does not fit fails
to compile: the command prints XLA's account of what it needs and exits
with status 1. T5X's precompile and MaxText's train_compile do the same.

Topologies are named like Cloud TPU accelerator types (`v5p-256`: 256
TensorCores, 128 chips; `v5e-256`, `v6e-64`: chips) or by their chip grid
(`v5p:4x4x8`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags
import gin
import jax
from jax.experimental import topologies

from t5x_adapt import cli
from t5x_adapt import gin_utils
from t5x_adapt import lora
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import quantization
from t5x_adapt import trainer as trainer_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation as this tool needs it.

  Attributes:
    name: Accelerator-type prefix (`v5p`).
    cores_per_chip: TensorCores a chip counts for in accelerator-type names
      (`v5p-8` is 4 chips).
    hbm_bytes: High-bandwidth memory of one chip.
    grids: Chip count -> chip grid of the standard slice shapes.
  """

  name: str
  cores_per_chip: int
  hbm_bytes: int
  grids: Mapping[int, tuple[int, ...]]


_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
             64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
             1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
             64: (8, 8), 128: (8, 16), 256: (16, 16)}

# HBM per chip available to a program, as libtpu 0.0.42 reports it when one
# does not fit ("exceeds available HBM (95.74G)").
CHIPS = {
    'v5p': Chip('v5p', 2, int(95.74 * GiB), _GRIDS_3D),
    'v5e': Chip('v5e', 1, int(15.75 * GiB), _GRIDS_2D),
    'v6e': Chip('v6e', 1, int(31.25 * GiB), _GRIDS_2D),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its chip generation and chip grid."""

  chip: Chip
  grid: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.grid)

  @property
  def grid_name(self) -> str:
    return f'{self.chip.name}:{"x".join(map(str, self.grid))}'

  @property
  def accelerator_type(self) -> str:
    return f'{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}'

  def devices(self) -> list[jax.Device]:
    """The slice's devices (one per chip), described by libtpu."""
    host_bounds = (2, 2, 1) if self.num_chips >= 4 else (1, 1, 1)
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=self.grid_name,
        chips_per_host_bounds=host_bounds, num_slices=1)
    devices = list(description.devices)
    if len(devices) != self.num_chips:
      raise ValueError(f'{self.grid_name}: libtpu describes {len(devices)} '
                       f'devices for {self.num_chips} chips')
    return devices


def parse_topology(text: str) -> Topology:
  """`v5p-256` (accelerator type) or `v5p:4x4x8` (chip grid) -> Topology."""
  match = re.fullmatch(r'(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))', text)
  if not match or match.group(1) not in CHIPS:
    raise ValueError(f'unknown topology {text!r}: expected e.g. v5p-256, '
                     f'v5e-256 or v5p:4x4x8 (chips: {", ".join(CHIPS)})')
  chip = CHIPS[match.group(1)]
  if match.group(3):
    grid = tuple(int(n) for n in match.group(3).split('x'))
    if len(grid) != len(next(iter(chip.grids.values()))):
      raise ValueError(f'{text}: a {chip.name} grid has '
                       f'{len(next(iter(chip.grids.values())))} dimensions')
    return Topology(chip, grid)
  cores = int(match.group(2))
  chips, remainder = divmod(cores, chip.cores_per_chip)
  if remainder or chips not in chip.grids:
    sizes = ', '.join(f'{chip.name}-{n * chip.cores_per_chip}'
                      for n in chip.grids)
    raise ValueError(f'{text}: no standard {chip.name} slice of that size; '
                     f'choose {sizes} or give a grid ({chip.name}:AxB...)')
  return Topology(chip, chip.grids[chips])


# ------------------------------------------------------------ the step --


@dataclasses.dataclass
class Report:
  """What one compilation says about the step, per chip."""

  recipe: str
  topology: str
  accelerator_type: str
  chips: int
  mesh: dict[str, int]
  batch: dict[str, tuple[int, ...]]
  parameters: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hbm_bytes: int
  compiled_flops: Optional[float]
  analytic_flops: int
  mosaic_kernels: int = 0
  frozen_bytes: int = 0  # A teacher's or a LoRA base's, all chips.

  @property
  def total_bytes(self) -> int:
    """Live at the step's peak: inputs, outputs not donated over them, and
    temporaries."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    gib = lambda n: f'{n / GiB:,.2f} GiB'
    flops = ('n/a' if self.compiled_flops is None else
             f'{self.compiled_flops:.4g} '
             f'({self.compiled_flops / self.analytic_flops:.2f}x analytic)')
    return [
        f'recipe      {self.recipe}',
        f'topology    {self.accelerator_type} ({self.topology}, '
        f'{self.chips} chips), mesh {self.mesh}',
        'batch       ' + ', '.join(f'{k} {v}' for k, v in
                                   sorted(self.batch.items())),
        f'parameters  {self.parameters:,} trained'
        + (f', {self.frozen_bytes / GiB:,.2f} GiB frozen (all chips)'
           if self.frozen_bytes else ''),
        f'per chip    argument {gib(self.argument_bytes)}, output '
        f'{gib(self.output_bytes)} ({gib(self.alias_bytes)} donated), temp '
        f'{gib(self.temp_bytes)}',
        f'total       {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM: '
        + ('fits' if self.fits else 'does NOT fit'),
        f'flops       analytic {self.analytic_flops:.4g} per step, compiled '
        f'{flops}; XLA counts a loop body once (one period of scanned '
        f'layers, one microbatch, one logits chunk)',
        f'kernels     {self.mosaic_kernels} Mosaic (Pallas) custom calls',
    ]


# How a Pallas (Mosaic) kernel appears in compiled TPU HLO.
_MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'


class DoesNotFit(RuntimeError):
  """The step needs more memory than a chip has (XLA's account attached)."""


def _compiled_flops(compiled, num_chips: int) -> Optional[float]:
  """FLOPs of the whole step from XLA's per-device cost analysis."""
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops']) * num_chips


def compile_step(topology: Topology, recipe: str = '') -> Report:
  """Compiles the gin-configured run's train step for `topology`.

  Gin must hold a training run (`t5x_adapt.train`'s bindings); nothing is
  allocated and no checkpoint or data is read.

  Raises:
    DoesNotFit: XLA could not fit the step into a chip's HBM.
  """
  run = gin.get_bindings('train', resolve_references=True)
  # The preset's vocabulary unless VOCAB_SIZE says otherwise (training may
  # widen it to a task's, which is not read here).
  vocab = {} if run.get('vocab_size') is None else {
      'vocab_size': run['vocab_size']}
  model = gin_utils.model_from_config(**vocab)
  if run.get('lora') is not None:
    model = lora.LoraModel(model, run['lora'])
  partitioner = partitioning.Partitioner(devices=topology.devices())
  trainer = trainer_lib.Trainer(model, partitioner, optimizers.optimizer(
      learning_rate=optimizers.schedule()))
  shapes = trainer.batch_shapes(run['task_feature_lengths'],
                                run['batch_size'])
  input_shapes = {k: v.shape for k, v in shapes.items()}
  try:
    compiled = trainer.compile_step(shapes)
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' in str(e):
      raise DoesNotFit(str(e)) from e
    raise
  memory = compiled.memory_analysis()
  return Report(
      recipe=recipe, topology=topology.grid_name,
      accelerator_type=topology.accelerator_type,
      chips=topology.num_chips, mesh=dict(partitioner.mesh.shape),
      batch={k: tuple(v) for k, v in input_shapes.items()},
      parameters=sum(math.prod(x.shape) for x in
                     jax.tree_util.tree_leaves(trainer.state_shapes().params)),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      hbm_bytes=topology.chip.hbm_bytes,
      compiled_flops=_compiled_flops(compiled, topology.num_chips),
      analytic_flops=model.train_step_flops(input_shapes),
      mosaic_kernels=compiled.as_text().count(_MOSAIC_CALL),
      frozen_bytes=sum(quantization.num_bytes(m.param_shapes())
                       for m in model.frozen_models().values()))


# ----------------------------------------------------------------- CLI --

_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'TPU slice: v5p-256, v5e-256, v6e-64, v5p:4x4x8, ...')
_JSON = flags.DEFINE_string('json', None,
                            'Also write the report as JSON to this file.')


def _largest_buffers(message: str, lines: int = 30) -> str:
  """XLA's out-of-memory account, from its list of the largest buffers on."""
  start = message.find('Largest program allocations')
  text = message[start:] if start >= 0 else message
  return '\n'.join(text.splitlines()[:lines])


def precompile() -> None:
  """The command: compile the run `cli.run` parsed for `--topology`."""
  if not _TOPOLOGY.value:
    raise app.UsageError('--topology is required (e.g. v5p-128)')
  topology = parse_topology(_TOPOLOGY.value)
  recipe = ' '.join(flags.FLAGS.gin_file)
  try:
    report = compile_step(topology, recipe)
  except DoesNotFit as e:
    print(f'{recipe}: the step does not fit {topology.accelerator_type} '
          f'({topology.chip.hbm_bytes / GiB:.2f} GiB HBM per chip):\n'
          f'{_largest_buffers(str(e))}', file=sys.stderr)
    sys.exit(1)
  print('\n'.join(report.lines()))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(dict(dataclasses.asdict(report),
                     total_bytes=report.total_bytes, fits=report.fits), f,
                indent=1)
  if not report.fits:
    sys.exit(1)


# What a training run needs and the compiled step does not read (the data,
# the checkpoints, the run directory; the schedule's length does not change
# the step): placeholders, so recipes that leave them to the command line
# compile as they are.
_UNREAD_MACROS = (
    "MODEL_DIR = '/nonexistent/precompile'",
    'TRAIN_STEPS = 100000',
    "MIXTURE_OR_TASK_NAME = 'unread by precompile'",
    "SOURCE_CHECKPOINT = 'unread by precompile'",
    "INIT_CHECKPOINT = 'unread by precompile'",
    "DECODER_SOURCE_CHECKPOINT = None",
)


def main(argv: Optional[Sequence[str]] = None) -> None:
  cli.run(precompile, argv, defaults=_UNREAD_MACROS)


if __name__ == '__main__':
  main()
