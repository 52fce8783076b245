"""The adaptation recipes under gin/adapt/ parse and build what they promise."""


import gin
import jax
import pytest

from t5x_adapt import distillation
from t5x_adapt import gin_utils
from t5x_adapt.models import EncoderDecoderModel

RECIPES = sorted(p.name for p in (gin_utils.REPO_ROOT / 'gin' / 'adapt').glob(
    't5gemma*.gin'))
# Macros a launch command supplies.
REQUIRED = ["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEPS = 10',
            "MIXTURE_OR_TASK_NAME = 'corpus_prefix_lm_spm8k'"]


def _parse(recipe):
  gin.clear_config()
  gin_utils.parse_gin([f'gin/adapt/{recipe}'], REQUIRED + [
      "SOURCE_CHECKPOINT = '/ckpt/source'",
      "DECODER_SOURCE_CHECKPOINT = '/ckpt/decoder'"])
  return gin_utils.model_from_config()


def test_every_size_has_both_objectives():
  sizes = {name.rsplit('_', 1)[0].removesuffix('_prefixlm') for name in RECIPES}
  assert sizes == {'t5gemma_tiny', 't5gemma_270m_270m', 't5gemma_2b_2b',
                   't5gemma_9b_9b', 't5gemma_9b_2b', 't5gemma2_tiny',
                   't5gemma2_270m_270m'}
  for size in sizes:
    assert {f'{size}_prefixlm_kd.gin', f'{size}_ul2.gin'} <= set(RECIPES)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_builds_its_model(recipe):
  model = _parse(recipe)
  kd = recipe.endswith('_prefixlm_kd.gin')
  assert isinstance(model, distillation.DistillationModel) == kd
  assert isinstance(model, EncoderDecoderModel)
  lengths = gin.query_parameter('%TASK_FEATURE_LENGTHS')
  assert set(lengths) == {'inputs', 'targets'}
  if recipe.startswith('t5gemma2_'):
    assert model.config.encoder_attention == 'merged'
    assert model.config.tie_embeddings
  unbalanced = not model.config.is_balanced
  assert gin.query_parameter('%CROSS_ATTENTION_WARMUP_STEPS') == (
      1000 if unbalanced else 0)
  count = sum(x.size for x in jax.tree_util.tree_leaves(
      model.param_shapes()))
  print(f'\n{recipe}: {type(model).__name__}, {count / 1e9:.3f}B parameters, '
        f'lengths {lengths}, batch {gin.query_parameter("%BATCH_SIZE")}')
  if 'tiny' not in recipe:
    # Pod scale: bfloat16 activations, parameters sharded over all devices.
    assert gin.query_parameter('StackConfig.dtype') == 'bfloat16'
    assert gin.query_parameter('%FSDP_PARALLELISM') == -1
