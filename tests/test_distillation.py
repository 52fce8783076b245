"""Knowledge distillation from a decoder-only teacher (t5x_adapt.distillation).

The teacher's distribution for target t must be the decoder-only model's
next-token distribution after BOS + inputs + targets[:t]: checked against
literal forwards of exactly that prefix, in a packed batch, with a sliding
window (8) shorter than the sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import distillation
from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.kernels import blocked
from t5x_adapt.losses import cross_entropy

BOS = 2
RTOL = 1e-5


@pytest.fixture(scope='module')
def student():
  gin_utils.load_model('t5gemma_tiny')
  gin_utils.parse_gin([], ['import t5x_adapt.distillation',
                           'MODEL = @DistillationModel()',
                           'DistillationModel.config = @EncoderDecoderConfig()'])
  model = gin_utils.model_from_config()
  assert isinstance(model, distillation.DistillationModel)
  return model


@pytest.fixture(scope='module')
def teacher_params(student):
  params = student.teacher.get_initial_variables(jax.random.PRNGKey(1),
                                                 {})['params']
  # Sharper than init so distributions differ markedly between positions.
  return jax.tree_util.tree_map(lambda x: 3 * x, params)


def _segments(rng, lengths):
  return [rng.integers(3, 512, n).astype(np.int32) for n in lengths]


def packed_batch(seed=0):
  """Two rows; the first packs two examples, the second one (and padding).

  Returns the batch and the examples [(row, inputs, targets, input_start,
  target_start)].
  """
  rng = np.random.default_rng(seed)
  layout = [[(9, 7), (5, 11)], [(13, 10)]]
  enc_len, dec_len = 16, 20
  batch = {k: np.zeros((2, enc_len if k.startswith('encoder') else dec_len),
                       np.int32) for k in (
                           'encoder_input_tokens', 'encoder_segment_ids',
                           'encoder_positions', 'decoder_input_tokens',
                           'decoder_target_tokens', 'decoder_segment_ids',
                           'decoder_positions', 'decoder_loss_weights')}
  examples = []
  for row, pairs in enumerate(layout):
    e = d = 0
    for segment, (n_in, n_tg) in enumerate(pairs, start=1):
      inputs, targets = _segments(rng, (n_in, n_tg))
      batch['encoder_input_tokens'][row, e:e + n_in] = inputs
      batch['encoder_segment_ids'][row, e:e + n_in] = segment
      batch['encoder_positions'][row, e:e + n_in] = np.arange(n_in)
      batch['decoder_target_tokens'][row, d:d + n_tg] = targets
      batch['decoder_input_tokens'][row, d:d + n_tg] = np.concatenate(
          [[BOS], targets[:-1]])
      batch['decoder_segment_ids'][row, d:d + n_tg] = segment
      batch['decoder_positions'][row, d:d + n_tg] = np.arange(n_tg)
      batch['decoder_loss_weights'][row, d:d + n_tg] = 1
      examples.append((row, inputs, targets, d))
      e, d = e + n_in, d + n_tg
  return batch, examples


def _next_token_logits(student, teacher_params, context, width=32):
  """The decoder-only teacher's logits after `context`: a literal forward of
  exactly that sequence (right-padded to one width, so one compilation)."""
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(context)] = context
  logits = _forward(student)(teacher_params, jnp.asarray(tokens))
  return np.asarray(logits[0, len(context) - 1])


def _forward(student):
  if not hasattr(student, '_test_forward'):
    student._test_forward = jax.jit(lambda p, t: student.teacher.compute_logits(
        p, {'decoder_input_tokens': t, 'decoder_target_tokens': t}))
  return student._test_forward


def test_teacher_sees_the_same_left_context(student, teacher_params):
  batch, examples = packed_batch()
  logits = np.asarray(jax.jit(student.teacher_logits)(teacher_params, batch))
  worst, checked = 0.0, 0
  for row, inputs, targets, start in examples:
    for t in range(len(targets)):
      context = np.concatenate([[BOS], inputs, targets[:t]])
      expected = _next_token_logits(student, teacher_params, context)
      error = np.abs(logits[row, start + t] - expected).max()
      worst = max(worst, error / np.abs(expected).max())
      checked += 1
  print(f'\nteacher logits vs literal prefix forwards: {checked} target '
        f'positions, max |diff| / max |logit| {worst:.2e}')
  assert checked == 28 and worst < RTOL


def test_teacher_logits_change_if_the_context_does(student, teacher_params):
  """The check above can fail: another context gives other logits."""
  batch, examples = packed_batch()
  logits = np.asarray(student.teacher_logits(teacher_params, batch))
  row, inputs, targets, start = examples[1]
  without_bos = _next_token_logits(
      student, teacher_params, np.concatenate([inputs, targets[:3]]))
  assert np.abs(logits[row, start + 3] - without_bos).max() > 1e-2


def test_one_hot_teacher_gives_the_hard_label_loss():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(1, 11, (2, 5)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
  one_hot = jnp.where(jax.nn.one_hot(targets, 11) > 0, 0.0, -jnp.inf)
  hard, _ = cross_entropy(logits, targets, weights)
  for label_weight in (0.0, 0.3):
    soft, metrics = distillation.distillation_loss(
        logits, one_hot, targets, weights, label_weight=label_weight)
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    np.testing.assert_allclose(metrics['cross_entropy'], hard, rtol=1e-6)
  print(f'\none-hot teacher: distillation {float(soft):.6f} = cross-entropy '
        f'{float(hard):.6f}')


def test_temperature_and_top_k_follow_their_definitions():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(1, 3, 7)).astype(np.float32)
  teacher = rng.normal(size=(1, 3, 7)).astype(np.float32)
  targets = np.ones((1, 3), np.int32)
  temperature, k = 2.0, 3

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  kept = np.where(teacher >= np.sort(teacher, -1)[..., -k:-k + 1], teacher,
                  -np.inf)
  probs = np.exp(log_softmax(kept / temperature))
  expected = -(probs * log_softmax(student / temperature)).sum(-1).mean()
  loss, _ = distillation.distillation_loss(
      student, teacher, targets, temperature=temperature, top_k=k)
  np.testing.assert_allclose(loss, expected * temperature**2, rtol=1e-5)


@pytest.mark.slow
def test_teacher_receives_no_gradient(student, teacher_params):
  batch, _ = packed_batch()
  params = student.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  grads = jax.grad(lambda tp: student.loss_fn(params, batch, None, tp)[0])(
      teacher_params)
  assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads))
  student_grads = jax.grad(
      lambda p: student.loss_fn(p, batch, None, teacher_params)[0])(params)
  assert any(np.asarray(g).any()
             for g in jax.tree_util.tree_leaves(student_grads))


def test_trainer_step_distils(student, teacher_params):
  """The jitted train step takes the teacher and lowers the KD loss."""
  batch, _ = packed_batch()
  trainer = trainer_lib.Trainer(
      student, partitioning.Partitioner(),
      optimizers.optimizer(learning_rate=3e-3, clip_norm=None))
  state = trainer.init_state()
  expected, _ = student.loss_fn(state.params, batch, None, teacher_params)
  losses = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, batch,
                                        {'teacher_params': teacher_params})
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
  print(f'\ndistillation loss over 5 steps on one batch: '
        f'{" ".join(f"{x:.4f}" for x in losses)}')
  assert losses[-1] < losses[0]


def test_train_step_flops_count_the_teachers_forward_pass():
  """MFU of a KD run: the student's step plus one teacher forward pass,
  against the matmul count written out for an all-global teacher."""
  from t5x_adapt import models, train  # pylint: disable=g-import-not-at-top
  config = gin_utils.load_model('t5gemma_tiny').config.map_stacks(
      attention_pattern=('global',), sliding_window=None)
  kd = distillation.DistillationModel(config)
  plain = models.EncoderDecoderModel(config)
  batch, inputs, targets = 4, 12, 10
  shapes = {'encoder_input_tokens': (batch, inputs),
            'decoder_input_tokens': (batch, targets),
            'decoder_target_tokens': (batch, targets)}
  teacher = kd.teacher.config
  tokens = inputs + targets  # BOS + inputs, then the decoder inputs
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in
                jax.tree_util.tree_leaves_with_path(kd.teacher.param_shapes())
                if 'kernel' in jax.tree_util.keystr(path))
  causal_pairs = tokens * (tokens + 1) // 2
  forward = (2 * kernels * tokens
             + teacher.num_layers * 4 * teacher.num_heads * teacher.head_dim
             * causal_pairs
             + 2 * teacher.embed_dim * teacher.vocab_size * targets)
  added = kd.train_step_flops(shapes) - plain.train_step_flops(shapes)
  print(f'\nKD step {kd.train_step_flops(shapes):,} FLOPs = student '
        f'{plain.train_step_flops(shapes):,} + teacher forward {added:,} '
        f'(written out: {batch * forward:,})')
  assert added == batch * forward
  structs = {k: jax.ShapeDtypeStruct(v, np.int32) for k, v in shapes.items()}
  assert train.Throughput(kd, structs, 1e12).flops == kd.train_step_flops(
      shapes)


def test_teacher_logits_with_tiled_attention_equal_dense(
    student, teacher_params, monkeypatch):
  """The teacher's sequence puts a segment's targets after every segment's
  inputs (and padding), so its positions do not follow its indices: a
  kernel skipping tiles by index would drop keys inside the window (here
  window 8, tiles of 4, segment 2's inputs 10+ indices before its targets)."""
  monkeypatch.setattr(blocked, 'DEFAULT_BLOCK_Q', 4)
  monkeypatch.setattr(blocked, 'DEFAULT_BLOCK_KV', 4)
  tiled = distillation.DistillationModel(
      student.config.map_stacks(attention_impl='blocked'))
  batch, _ = packed_batch()
  want = student.teacher_logits(teacher_params, batch)
  got = tiled.teacher_logits(teacher_params, batch)
  valid = batch['decoder_segment_ids'] > 0
  error = np.max(np.abs(np.asarray(got - want))[valid])
  assert error / np.max(np.abs(np.asarray(want))[valid]) < RTOL
