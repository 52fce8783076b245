"""The supported checkpoint sources: one row (`Source`) per architecture.

A row holds everything the converters know about one architecture of one
kind of checkpoint (a transformers class, a GGUF architecture): how its
config becomes ours and back, how it names each tensor (a
`tables.NameScheme` and the prefix of each stack), which of its tensors copy
another (tied tables and heads), which parts of it we do not build (a vision
tower) and which `StackConfig` fields the architecture fixes. A reader looks
its row up by (kind, architecture name) (`find`); `save_hf` by the model it
writes (`writer`). Each reader module declares the rows of its kind and
registers them when imported: `hf.SOURCES` (transformers classes) and
`gguf.SOURCES` (GGUF architectures). Nothing else in `convert/` asks which
architecture or which kind of model it has.

How to add a family: write its gin stack file
(`gin/models/stacks/<name>.gin`, the StackConfig of a real size, `family`
set to the new name) and add one row to `hf.SOURCES`: for a Llama-style
class `hf_families.llama_style(architecture, model_type, ...)` with what
sets it apart, for a Gemma-style one `hf_families.gemma(...)`. A class whose
config or tensor names differ in a new way also needs a config function or
a `NameScheme` in `hf_families`. A new kind of checkpoint (the gemma
library's Flax format, say) is a reader module that declares and registers
its rows, and a case in `load.checkpoint_kind`. `tests/test_hf_parity.py`
compares the logits with transformers' for a fixture of each class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

from t5x_adapt.checkpoints import errors
from t5x_adapt.convert.tables import IDENTITY, NameScheme, Rule, stack_rules

# Kinds of checkpoint that have rows (our orbax checkpoints need none: they
# store our own tree and config).
TRANSFORMERS = 'transformers'
GGUF = 'gguf'

Config = Any  # StackConfig | EncoderDecoderConfig


@dataclasses.dataclass(frozen=True)
class Source:
  """One supported architecture of one kind of checkpoint.

  Attributes:
    kind: The kind of checkpoint (`TRANSFORMERS`, `GGUF`).
    architecture: The checkpoint's name for the architecture: the
      transformers class (config.json's `architectures`, also written on
      export) or GGUF's `general.architecture`.
    family: `StackConfig.family` of every stack read (and written) as this
      source.
    config_in: (the checkpoint's config: config.json as a dict, or the
      `gguf.GGUFReader`; the file name, for messages) -> our config. Its
      `family` and `implied` fields are set afterwards (`read_config`).
    names: How the checkpoint spells the tensors of a stack.
    prefixes: {our stack name: the prefix of its tensors' names}.
    implied: StackConfig fields the architecture fixes but its config does
      not state (Gemma 3's QK norm, Qwen 2's biases): set on read, required
      on export.
    config_out: Our config -> the checkpoint's config (without
      `architectures` and `model_type`); None: not written.
    model_type: config.json's `model_type` on export.
    encoder_attention: None for a decoder-only source; otherwise the
      `EncoderDecoderConfig.encoder_attention` it has ('cross': the decoder
      has cross-attention tensors).
    lm_head: Name of the tensor of an untied LM head
      (`StackConfig.tie_lm_head=False`); None: the source has none.
    tables_from: The stack whose embedding tensors every stack reads (T5Gemma
      2 stores one table, with the encoder); None: each stack its own. A
      model with tied tables (`EncoderDecoderConfig.tie_embeddings`) has
      one, at `config.embedder_path(stack)` for every stack: one rule reads
      it (from `tables_from`, else from the decoder, whose table is the LM
      head) and writes it under every name the source stores it as.
    tied: Names of tensors that copy one read under another name (a tied LM
      head, T5Gemma 2's decoder table): skipped when present, not written.
    vision_tower: Name prefixes of a vision tower, which t5x_adapt does not
      build: an error unless the caller reads the text model (`text_only`).
    module_renames: (tensor-name prefix, module-name prefix) pairs where the
      loaded torch model names its modules otherwise than the checkpoint
      names their tensors (transformers renames T5Gemma 2's encoder layers
      into `text_model` on load): PEFT adapters address modules.
  """

  kind: str
  architecture: str
  family: str
  config_in: Callable[[Any, str], Config]
  names: NameScheme
  prefixes: Mapping[str, str]
  implied: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  config_out: Optional[Callable[[Config], dict]] = None
  model_type: Optional[str] = None
  encoder_attention: Optional[str] = None
  lm_head: Optional[str] = None
  tables_from: Optional[str] = None
  tied: tuple[str, ...] = ()
  vision_tower: tuple[str, ...] = ()
  module_renames: tuple[tuple[str, str], ...] = ()

  def module_name(self, tensor_name: str) -> str:
    """The torch module that holds the tensor `tensor_name` (`.weight`
    dropped)."""
    name = tensor_name.removesuffix('.weight')
    for prefix, module_prefix in self.module_renames:
      if name.startswith(prefix):
        return module_prefix + name.removeprefix(prefix)
    return name

  # ---------------------------------------------------------------- configs

  def read_config(self, external, source: str) -> Config:
    """Our config of a checkpoint of this architecture (run fields at their
    defaults)."""
    config = self.config_in(external, source)
    return config.map_stacks(family=self.family, **self.implied)

  def writes(self, config: Config) -> bool:
    """Whether `config` is a model this row writes (`writer`)."""
    attention = (config.encoder_attention if config.is_encoder_decoder
                 else None)
    return (self.config_out is not None and
            attention == self.encoder_attention and
            all(stack.family == self.family
                for stack in config.stacks().values()))

  def write_config(self, config: Config) -> dict:
    """The checkpoint's config of `config` (e.g. config.json's dict).

    Raises:
      UnsupportedArchitectureError: a stack differs from what the
        architecture fixes (`implied`), or from what its config can say.
    """
    differing = sorted({
        f'{name}={getattr(stack, name)!r} (expected {value!r})'
        for stack in config.stacks().values()
        for name, value in self.implied.items()
        if getattr(stack, name) != value})
    if differing:
      raise errors.UnsupportedArchitectureError(
          f'{self.architecture} has no equivalent of {", ".join(differing)}')
    return {'architectures': [self.architecture],
            'model_type': self.model_type, **self.config_out(config)}

  # ---------------------------------------------------------------- tensors

  def rules(self, config: Config) -> list[Rule]:
    """Every tensor of a model of `config`: its name here and our path in
    the unrolled layout, one rule per path.

    A stack's table goes where the config keeps it (`embedder_path`): a
    model with tied tables has one, which every stack's rules target; they
    become one rule (`_one_rule_per_target`).
    """
    stacks = config.stacks()
    by_stack = {}
    for name, prefix in self.prefixes.items():
      cross = name == 'decoder' and self.encoder_attention == 'cross'
      by_stack[name] = stack_rules(self.names, prefix, name, stacks[name],
                                   cross, config.embedder_path(name))
      if not stacks[name].tie_lm_head:
        by_stack[name].append(self._lm_head_rule(name))
    if self.tables_from is not None:
      by_stack = _tables_read_from(by_stack, self.tables_from, config)
    return _one_rule_per_target(by_stack, self.tables_from or _HEAD_STACK)

  def _lm_head_rule(self, stack: str) -> Rule:
    if self.lm_head is None:
      raise errors.UnsupportedArchitectureError(
          f'{self.architecture} has no untied LM head (tie_lm_head=False)')
    return Rule(self.lm_head, (stack, 'lm_head', 'embedding'), IDENTITY)

  def ignorable(self, name: str, text_only: bool) -> bool:
    """Whether the checkpoint may hold `name` without a rule reading it."""
    return name in self.tied or (text_only and
                                 name.startswith(self.vision_tower))

  def check_vision_tower(self, names: Iterable[str], text_only: bool,
                         source: str) -> None:
    """A vision tower in the checkpoint is an error unless `text_only`."""
    vision = sorted(n for n in names if n.startswith(self.vision_tower))
    if vision and not text_only:
      raise errors.UnsupportedArchitectureError(
          f'{source}: the checkpoint has a vision tower ({len(vision)} '
          f'tensors, e.g. {vision[0]!r}), which t5x_adapt does not build; '
          'pass text_only=True (`python -m t5x_adapt.convert --text_only`) '
          'to read the text model without it')


# The stack whose table a model with tied tables reads from a format that
# stores one per stack: the decoder's, which is also the LM head.
_HEAD_STACK = 'decoder'


def _table_rules(rules: list[Rule], path: tuple[str, ...]) -> dict:
  """{table leaf ('embedding', 'eoi_embedding'): rule} of the rules of one
  stack whose target is under its table's `path`."""
  return {r.target[-1]: r for r in rules if r.target[:len(path)] == path}


def _tables_read_from(by_stack: Mapping[str, list[Rule]], stack: str,
                      config: Config) -> dict[str, list[Rule]]:
  """{stack: rules}, every stack's table read from the tensors of `stack`'s
  (the only ones the format stores)."""
  names = {leaf: r.source for leaf, r in _table_rules(
      by_stack[stack], config.embedder_path(stack)).items()}
  out = {}
  for name, rules in by_stack.items():
    table = _table_rules(rules, config.embedder_path(name))
    out[name] = [dataclasses.replace(r, source=names[r.target[-1]])
                 if table.get(r.target[-1]) is r else r for r in rules]
  return out


def _one_rule_per_target(by_stack: Mapping[str, list[Rule]],
                         reader: str) -> list[Rule]:
  """The stacks' rules, those that target one path (a tied table) merged
  into one in the place of the first: it reads the `reader` stack's
  tensor, and the other stacks' names, where the format stores a copy per
  stack, are its aliases (written on export, unread on import)."""
  merged: dict[tuple[str, ...], Rule] = {}
  for stack, rules in by_stack.items():
    for rule in rules:
      first = merged.setdefault(rule.target, rule)
      if first is rule or rule.source == first.source:
        continue
      if stack == reader:
        first, rule = rule, first
      merged[rule.target] = dataclasses.replace(
          first, aliases=first.aliases + (rule.source,) + rule.aliases)
  return list(merged.values())


# ------------------------------------------------------------------ lookup --

_SOURCES: dict[tuple[str, str], Source] = {}


def register(*sources: Source) -> None:
  """Adds rows; a second row for one (kind, architecture) is an error."""
  for row in sources:
    key = (row.kind, row.architecture)
    if key in _SOURCES:
      raise ValueError(f'{row.kind} architecture {row.architecture!r} is '
                       'registered twice')
    _SOURCES[key] = row


def architectures(kind: str) -> list[str]:
  """The architecture names of `kind` that have a row, sorted."""
  return sorted(arch for k, arch in _SOURCES if k == kind)


def find(kind: str, architecture: Optional[str], where: str) -> Source:
  """The row of `architecture` in checkpoints of `kind`.

  Raises:
    UnsupportedArchitectureError: no row; the message names `where` and the
      supported architectures.
  """
  row = _SOURCES.get((kind, architecture))
  if row is None:
    raise errors.UnsupportedArchitectureError(
        f'{where}: {kind} architecture {architecture!r} is not supported; '
        f'supported: {", ".join(architectures(kind))}')
  return row


def writer(kind: str, config: Config) -> Source:
  """The row that writes a model of `config` as a checkpoint of `kind`.

  Raises:
    UnsupportedArchitectureError: none does; the message lists what can be
      written.
  """
  rows = [row for row in _SOURCES.values() if row.kind == kind]
  for row in rows:
    if row.writes(config):
      return row
  writable = [f'{row.architecture} ({_describe(row)})' for row in rows
              if row.config_out is not None]
  families = sorted({stack.family for stack in config.stacks().values()})
  model = (f'an encoder-decoder with {config.encoder_attention!r} attention'
           if config.is_encoder_decoder else 'a decoder-only model')
  raise errors.UnsupportedArchitectureError(
      f'no {kind} architecture writes {model} of family '
      f'{"/".join(families)}; written: {"; ".join(writable)}')


def _describe(row: Source) -> str:
  if row.encoder_attention is None:
    return f'decoder-only, family {row.family!r}'
  return (f'encoder-decoder, {row.encoder_attention!r} attention, family '
          f'{row.family!r}')
