"""Dropout (config.model.attention_dropout, model.dropout, head.dropout) acts in training only.

The loss draws it from its own stream of the step's key (so a step stays a pure function of the
state and batch, and resume stays bit-for-bit); init, the samplers and evaluation never pass a
dropout key, so they see the deterministic network.
"""
import jax
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.training.experiment import Experiment

from conftest import REPO_ROOT

CONFIGS = {"causal": "configs/digits.py:smoke", "mar": "configs/digits_mar.py:smoke"}


def _experiment(family, rate):
  config = configs.load(str(REPO_ROOT / CONFIGS[family]))
  config.model.attention_dropout = config.model.dropout = config.head.dropout = rate
  config.mesh.shape = (1, 1, 1)
  return Experiment(config, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                                    ("data", "fsdp", "tensor")))


@pytest.mark.parametrize("family", ["causal"])  # MAR's blocks: test_mar_backbone_block_drops_out
def test_dropout_changes_the_training_loss_and_not_the_samples(family):
  plain, dropped = _experiment(family, 0.0), _experiment(family, 0.3)
  params = jax.tree.map(lambda p: p + 0.01, plain.init_state()[0].params)  # past the zero init
  rng = np.random.default_rng(0)
  tokens = plain.tokenizer.encode(rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32))
  labels = np.arange(4)
  key = jax.random.PRNGKey(1)
  loss = lambda exp, k: float(exp.loss_fn(params, tokens, labels, k))
  assert loss(dropped, key) != loss(plain, key)
  assert loss(dropped, key) == loss(dropped, key)  # a pure function of the step's key
  assert loss(dropped, key) != loss(dropped, jax.random.PRNGKey(2))
  images = lambda exp: np.asarray(exp.sampler()(params, labels, jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(images(dropped), images(plain))


def test_mar_backbone_block_drops_out_with_a_dropout_key_only():
  """MAR's ViT block (the masked family's loss passes the key as the causal one does)."""
  from arjax.families.masked.backbone import ViTBlock
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  block = ViTBlock(num_heads=2, mlp_ratio=2.0, norm_eps=1e-6, attention_dropout=0.3, dropout=0.3)
  params = block.init(jax.random.PRNGKey(1), x)
  plain = ViTBlock(num_heads=2, mlp_ratio=2.0, norm_eps=1e-6).apply(params, x)
  np.testing.assert_array_equal(block.apply(params, x), plain)  # no key: deterministic
  dropped = block.apply(params, x, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(dropped, plain)


def test_a_dropout_rate_outside_0_1_names_its_field():
  config = configs.load(str(REPO_ROOT / CONFIGS["causal"]))
  config.head.dropout = 1.0
  with pytest.raises(ConfigError, match=r"config.head.dropout=1.0.*in \[0, 1\)"):
    Experiment(config)
