"""Scanned blocks (`model.scan_layers`) and rematerialisation (`model.remat`) change how the
backbone is compiled, never what it computes: with the same weights (stacked on a 'layers'
axis) the scanned model gives the unrolled one's outputs, KV-cached samples and gradients."""
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.training.experiment import Experiment
from arjax.layers import transformer as layers
from arjax.families.causal.sampler import sample_tokens
from tests.conftest import REPO_ROOT


def _build(scan_layers, remat="none", depth=3):
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.model.depth = depth
  config.model.scan_layers = scan_layers
  config.model.remat = remat
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, head, loss = registry.build_model(config, tok)
  return config, tok, model, head, loss


def _stack_blocks(params, depth):
  """Unrolled parameters (block_0 .. block_{d-1}) -> scanned ones (blocks, leading layer axis)."""
  return {**params, "backbone": layers.stack_unrolled_blocks(params["backbone"], "block", depth,
                                                             "blocks")}


@pytest.fixture(scope="module")
def twins():
  _, tok, unrolled, head, loss = _build(False)
  _, _, scanned, _, scanned_loss = _build(True)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, tok.num_tokens, tok.token_dim))
  labels = jnp.array([0, 3, 7, 9])
  params = nn.meta.unbox(unrolled.init(jax.random.PRNGKey(1), x, labels)["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return dict(tok=tok, head=head, x=x, labels=labels, unrolled=unrolled, scanned=scanned,
              params=params, stacked=_stack_blocks(params, 3), loss=loss,
              scanned_loss=scanned_loss)


def test_scanned_parameters_carry_a_layers_axis():
  _, tok, scanned, _, _ = _build(True)
  x = jnp.zeros((1, tok.num_tokens, tok.token_dim))
  boxed = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32)))
  gate = boxed["params"]["backbone"]["blocks"]["mlp"]["gate"]["kernel"]
  assert gate.names == ("layers", "embed", "mlp") and gate.value.shape[0] == 3


def test_scanned_forward_equals_unrolled(twins):
  t = twins
  z_unrolled = t["unrolled"].apply({"params": t["params"]}, t["x"], t["labels"])
  z_scanned = t["scanned"].apply({"params": t["stacked"]}, t["x"], t["labels"])
  np.testing.assert_allclose(z_scanned, z_unrolled, rtol=1e-5, atol=1e-5)


def test_scanned_kv_cached_sampling_equals_unrolled(twins):
  t = twins
  run = lambda model, params: jax.jit(functools.partial(
      sample_tokens, model=model, head=t["head"], guided=True, num_steps=2,
      num_tokens=t["tok"].num_tokens))(params, t["labels"], jax.random.PRNGKey(5),
                                       jnp.full((t["tok"].num_tokens,), 2.0), 1.0)
  tokens_unrolled, _ = run(t["unrolled"], t["params"])
  tokens_scanned, _ = run(t["scanned"], t["stacked"])
  np.testing.assert_allclose(tokens_scanned, tokens_unrolled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_loss_and_gradients(twins, remat):
  t = twins
  _, _, _, _, remat_loss = _build(True, remat)
  rng = jax.random.PRNGKey(3)
  grad = lambda loss, params: jax.jit(jax.value_and_grad(loss))(params, t["x"], t["labels"], rng)
  value, grads = grad(t["scanned_loss"], t["stacked"])
  remat_value, remat_grads = grad(remat_loss, t["stacked"])
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_scanned_model_trains_sharded_with_the_layers_axis_replicated():
  config, *_ = _build(True, "dots")
  config.mesh.shape = (2, 2, 2)
  exp = Experiment(config)
  state, shardings = exp.init_state()
  gate = state.params["backbone"]["blocks"]["mlp"]["gate"]["kernel"]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_an_unknown_remat_policy_is_a_config_error():
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.model.remat = "some"
  with pytest.raises(configs.ConfigError, match="config.model.remat='some'"):
    registry.validate(config)
