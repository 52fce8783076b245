"""The train state and the jitted, sharded train step.

The trainer knows a model only through its interface (`loss_fn`,
`get_initial_variables`, `logical_axes`) and devices only through the
`Partitioner`. One step: split the global batch into microbatches, accumulate
token-weighted gradients with `lax.scan`, apply the optax update unless the
step guard refuses it (`t5x_adapt.step_guard`: a non-finite loss, gradient
or update, or a loss spike). The step is jitted once with explicit
input/output shardings and donates the old state.

Parameters a model reads but does not train (`BaseModel.frozen_models`: a
distillation teacher's, `t5x_adapt.distillation`; the base of a LoRA model,
`t5x_adapt.lora`) are a further argument of the step, a dict by `loss_fn`
keyword: sharded by their own model's logical axes, never differentiated,
never part of the TrainState (so never in the optimizer state or the
checkpoints).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax
import gin
import jax
import jax.numpy as jnp
import optax

from t5x_adapt import step_guard
from t5x_adapt.partitioning import Partitioner

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and goes into checkpoints)."""

  step: jax.Array  # Steps taken, applied or not (batches consumed).
  params: Any
  opt_state: Any
  guard: step_guard.GuardState  # Counters of skipped steps.


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[batch, ...] -> [microbatches, batch / microbatches, ...]."""
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by '
                       f'{num_microbatches} microbatches')
    return x.reshape(num_microbatches, -1, *x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


@gin.configurable
class Trainer:
  """Builds, shards and steps a `TrainState`.

  Args:
    model: A `t5x_adapt.models` model.
    partitioner: Mesh and logical-axis rules.
    optimizer: optax transformation.
    num_microbatches: Gradient accumulation steps per train step.
    seed: Seeds parameter init and dropout.
    guard: Which steps are not applied (default: the gin-configured
      `StepGuard`).
  """

  def __init__(self, model, partitioner: Partitioner,
               optimizer: optax.GradientTransformation,
               num_microbatches: int = 1, seed: int = 0,
               guard: Optional[step_guard.StepGuard] = None):
    self.model = model
    self.partitioner = partitioner
    self.optimizer = optimizer
    self.num_microbatches = num_microbatches
    self.seed = seed
    self.guard = guard or step_guard.StepGuard()
    self._compiled = {}

  # ----------------------------------------------------------- shardings --

  @functools.cached_property
  def _abstract_state(self) -> TrainState:
    # From the model's cached parameter shapes: the optimizer and the guard
    # are traced, the model is not traced again.
    return jax.eval_shape(self._fresh_state, self.model.param_shapes())

  def state_shapes(self) -> TrainState:
    """Abstract TrainState (ShapeDtypeStructs), nothing allocated.

    Computed once: parameters, and so the whole state, do not depend on the
    shapes of the batches.
    """
    return self._abstract_state

  @functools.cached_property
  def _state_shardings(self) -> TrainState:
    param_shardings = self.partitioner.shardings(self.model.logical_axes())
    replicated = self.partitioner.replicated
    shapes = self.state_shapes()

    def like_param(leaf, param, sharding):
      if isinstance(leaf, optax.MaskedNode):
        return leaf
      return sharding if leaf.shape == param.shape else replicated

    opt_shardings = optax.tree_map_params(
        self.optimizer, like_param, shapes.opt_state, shapes.params,
        param_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings,
        guard=jax.tree_util.tree_map(lambda _: replicated, shapes.guard))

  def state_shardings(self) -> TrainState:
    """Shardings of every leaf of the TrainState (computed once).

    Each copy of the parameter tree inside the optimizer state (Adam's
    moments, say) takes the parameters' shardings, leaf by leaf. Leaves in a
    parameter's place but of another shape (Adafactor's factored statistics)
    and everything else (step counts) are replicated; the empty placeholders
    of frozen parameters stay empty. (Matching by shape alone would mix up
    equal-shaped parameters with different shardings, e.g. query and key
    kernels of multi-head models.)
    """
    return self._state_shardings

  # ---------------------------------------------------------------- init --

  def _fresh_state(self, params=None) -> TrainState:
    if params is None:
      params = self.model.get_initial_variables(
          jax.random.PRNGKey(self.seed))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params),
                      guard=self.guard.init())

  def init_state(self, params=None) -> TrainState:
    """A sharded TrainState, from scratch or around given `params`."""
    shardings = self.state_shardings()
    if params is not None:
      params = jax.device_put(params, shardings.params)
    init = self.partitioner.jit(self._fresh_state,
                                in_shardings=None, out_shardings=shardings)
    return init(params)

  def context(self):
    """Mesh + logical rules, for tracing model code."""
    return self.partitioner.context()

  # ---------------------------------------------------------------- step --

  def _grads(self, params, batch, rng, frozen):
    """Token-weighted gradient sum over microbatches, and summed metrics."""

    def microbatch_loss(p, mb, mb_rng):
      loss, metrics = self.model.loss_fn(p, mb, mb_rng, **frozen)
      # Undo the per-microbatch mean so microbatches weigh by their tokens.
      return loss * metrics['num_tokens'], metrics

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)
    microbatches = _split_microbatches(batch, self.num_microbatches)
    rngs = jax.random.split(rng, self.num_microbatches)

    def accumulate(carry, inputs):
      grads, loss_sum, tokens = carry
      mb, mb_rng = inputs
      (mb_loss, metrics), mb_grads = grad_fn(params, mb, mb_rng)
      grads = jax.tree_util.tree_map(jnp.add, grads, mb_grads)
      return (grads, loss_sum + mb_loss, tokens + metrics['num_tokens']), (
          metrics['accuracy'] * metrics['num_tokens'])

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, loss_sum, tokens), correct = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0), (microbatches, rngs))
    denominator = jnp.maximum(tokens, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
    metrics = {'loss': loss_sum / denominator, 'num_tokens': tokens,
               'accuracy': jnp.sum(correct) / denominator}
    return grads, metrics

  def _step(self, state: TrainState, batch: Batch, frozen=None):
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), state.step)
    grads, metrics = self._grads(state.params, batch, rng, frozen or {})
    updates, opt_state = self.optimizer.update(grads, state.opt_state,
                                               state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    (params, opt_state), guard, guard_metrics = self.guard(
        state.guard, metrics['loss'], metrics['grad_norm'],
        optax.tree.norm(params), new=(params, opt_state),
        old=(state.params, state.opt_state))
    metrics.update(guard_metrics, param_norm=optax.tree.norm(params))
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state, guard=guard), metrics

  @property
  def has_teacher(self) -> bool:
    return self.model.teacher is not None

  def frozen_shardings(self) -> dict:
    """Shardings of each frozen argument (by its model's logical axes)."""
    return {name: self.partitioner.shardings(model.logical_axes())
            for name, model in self.model.frozen_models().items()}

  def teacher_shardings(self):
    """Shardings of the teacher's parameters (by its logical axes)."""
    return self.frozen_shardings()['teacher_params']

  def batch_shapes(self, task_feature_lengths: Mapping[str, int],
                   batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batches a run of this model feeds the step (packed)."""
    return self.model.batch_shapes(task_feature_lengths, batch_size)

  def compile_step(self, batch_shapes: Mapping[str, jax.ShapeDtypeStruct]):
    """The train step compiled ahead of time for global batches of these
    shapes: every place that compiles a step (training, `precompile`, the
    benchmarks) comes here.

    The compiled step is `step(state, batch)`, or `step(state, batch,
    frozen)` for models with frozen parameters (`frozen_shardings`).
    """
    args = (self.state_shapes(), dict(batch_shapes))
    if frozen := self.model.frozen_models():
      args += ({name: model.param_shapes() for name, model in frozen.items()},)
    return self.jitted_step(batch_shapes).lower(*args).compile()

  def jitted_step(self, batch_shapes: Mapping[str, jax.ShapeDtypeStruct]):
    """The train step jitted with its shardings (what `compile_step`
    compiles), for callers that need jit's own dispatch."""
    state_shardings = self.state_shardings()
    batch_shardings = {k: self.partitioner.batch_sharding
                       for k in batch_shapes}
    in_shardings = (state_shardings, batch_shardings)
    if self.model.frozen_models():
      in_shardings += (self.frozen_shardings(),)
    return self.partitioner.jit(
        self._step, in_shardings,
        (state_shardings, self.partitioner.replicated), donate_argnums=(0,))

  def train_step(self, state: TrainState, batch: Batch,
                 *frozen: Mapping[str, Any]):
    """One optimizer step on a global batch (compiled once per shape);
    `frozen`: the dict of frozen parameters, for models that have them."""
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in batch.items()}
    key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in shapes.items()))
    if key not in self._compiled:
      self._compiled[key] = self.compile_step(shapes)
    return self._compiled[key](state, batch, *frozen)


def memory_summary(compiled) -> str:
  """The compiled step's memory use, as XLA reports it."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return 'memory analysis unavailable on this backend'
  if analysis is None:
    return 'memory analysis unavailable on this backend'
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  parts = [f'{f.removesuffix("_size_in_bytes")} '
           f'{getattr(analysis, f, 0) / 2**20:.1f} MiB' for f in fields]
  return ', '.join(parts)

