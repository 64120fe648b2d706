"""Every shipped config validates and builds; bad configs fail at start, naming the field."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import pytest

from arjax import registry
from arjax.config import schema as configs
from conftest import REPO_ROOT

CONFIGS = ["digits.py", "digits.py:smoke", "cifar10.py", "imagenet256.py", "digits_shortcut.py",
           "digits_recurrent.py", "digits_recurrent.py:hybrid", "xar_cpu_bench.py",
           "xar_cpu_bench.py:smoke", "digits_arflow.py", "digits_arflow.py:smoke"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_validates_and_builds_its_model(name):
  config = configs.load(str(REPO_ROOT / "configs" / name))
  registry.validate(config)
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, _, _ = registry.build_model(config, tok)
  x = jnp.zeros((2, tok.num_tokens, tok.token_dim), jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, y))["params"]
  backbone = params["backbone"]
  # The xar family keeps the official names: one learned table per encoder / decoder.
  pos_embed = backbone["pos_embed"] if "pos_embed" in backbone else backbone["encoder_pos_embed_learned"]
  assert pos_embed.value.shape[1] == config.model.width
  # Every parameter carries logical axis names, one per dimension, all known to the rules table.
  boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  known = {name for name, _ in config.sharding.rules}
  for leaf in boxed:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


# MAR's published model sizes (Li et al. 2024, Table / README), in millions of parameters.
MAR_CONFIGS = {"imagenet256_mar_base.py": 208, "imagenet256_mar_large.py": 479,
               "imagenet256_mar_huge.py": 943}


@pytest.mark.parametrize("name, millions", MAR_CONFIGS.items())
def test_mar_imagenet_configs_validate_and_build_at_the_published_sizes(name, millions):
  """KL-16 tokens (256 of dim 16) and MAR's sizes to 0.5%; built abstractly, since the VAE
  weights are not shipped (building for real without them is refused, naming the field)."""
  config = configs.load(str(REPO_ROOT / "configs" / name))
  registry.validate(config)
  with pytest.raises(configs.ConfigError, match="config.tokenizer.checkpoint is None"):
    registry.make_tokenizer(config.tokenizer, config.data)
  tok = registry.make_tokenizer(config.tokenizer, config.data, abstract=True)
  assert (tok.num_tokens, tok.token_dim) == (256, 16)
  model, _, _ = registry.build_model(config, tok)
  x = jnp.zeros((2, tok.num_tokens, tok.token_dim), jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, y))["params"]
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert abs(count / 1e6 - millions) < 0.005 * millions, count


def _digits():
  return configs.load(str(REPO_ROOT / "configs/digits.py"))


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.model.__setitem__("dept", 4), "config.model.dept: unknown key"),
    (lambda c: c.train.__setattr__("num_steps", 0), "config.train.num_steps=0: must be > 0"),
    (lambda c: c.model.__setattr__("num_heads", 3), "config.model.width=128 must be divisible"),
    (lambda c: c.tokenizer.__setattr__("patch_size", 3), "config.tokenizer.patch_size=3"),
    (lambda c: c.sample.__setattr__("cfg_scale", -1.0), "config.sample.cfg_scale=-1.0"),
    (lambda c: c.sample.__setattr__("num_steps", 0), "config.sample.num_steps=0"),
    (lambda c: c.data.__setattr__("data_dir", None), None),
    (lambda c: c.mesh.__setattr__("shape", (1, 1)), "config.mesh.shape"),
    (lambda c: c.sharding.__setattr__("rules", (("embed",),)), "config.sharding.rules[0]"),
])
def test_bad_config_is_refused_naming_the_field(mutate, field):
  config = _digits()
  with config.unlocked():
    mutate(config)
  if field is None:  # a valid change: the control case
    registry.validate(config)
    return
  with pytest.raises(configs.ConfigError) as e:
    registry.validate(config)
  assert field in str(e.value)


def test_wrong_types_are_refused_on_assignment_and_in_files():
  config = _digits()
  with pytest.raises(TypeError, match="num_steps"):  # ml_collections' own type lock
    config.train.num_steps = "many"
  as_dict = config.to_dict()
  as_dict["train"]["num_steps"] = "many"  # as a hand-written config file could hold it
  with pytest.raises(configs.ConfigError, match="config.train.num_steps='many': expected int"):
    registry.validate(ml_collections.ConfigDict(as_dict))
