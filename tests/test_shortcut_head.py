"""The shortcut head (`head.name='shortcut'`, FAR): a flow head conditioned on its step size.

It starts as its flow net for every step size; its self-consistency target is two half steps;
a network that is the exact shortcut of its data has zero loss and samples it in one step;
and it trains and samples through the causal and MAR families in K steps from the config.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.heads.flow import FlowHeadNet
from arjax.heads.shortcut import Shortcut, ShortcutHeadNet, consistency_target
from conftest import REPO_ROOT


def test_an_untrained_shortcut_net_is_its_flow_net_at_every_step_size():
  net = ShortcutHeadNet(token_dim=3, width=16, depth=2)
  x, z = jax.random.normal(jax.random.PRNGKey(0), (5, 3)), jnp.ones((5, 4))
  t = jnp.linspace(0.1, 0.9, 5)
  params = net.init(jax.random.PRNGKey(1), x, (t, t), z)["params"]
  # Perturb the flow net's zero-started output layers so that the comparison means something.
  velocity = jax.tree.map(lambda p: p + 0.1, nn.meta.unbox(params["velocity"]))
  params = dict(nn.meta.unbox(params), velocity=velocity)
  flow = FlowHeadNet(token_dim=3, width=16, depth=2).apply({"params": velocity}, x, t, z)
  for d in (0.0, 0.25, 1.0):
    s = net.apply({"params": params}, x, (t, jnp.full((5,), d)), z)
    np.testing.assert_allclose(np.asarray(s), np.asarray(flow), rtol=1e-6, atol=1e-6)


def test_the_consistency_target_is_the_mean_of_two_half_steps():
  net = lambda x, time, z: x * time[0][:, None] + time[1][:, None] + z  # any smooth net
  x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  t, d, z = jnp.array([1.0, 0.5]), jnp.array([0.5, 0.25]), jnp.array([[0.1], [0.2]])
  first = x * t[:, None] + d[:, None] + z
  x_mid = x - d[:, None] * first
  second = x_mid * (t - d)[:, None] + d[:, None] + z
  np.testing.assert_allclose(consistency_target(net, x, t, d, z), (first + second) / 2, rtol=1e-6)
  # At the smallest level the half steps ask for the flow velocity (d = 0), stepping by d.
  first0 = x * t[:, None] + z
  second0 = (x - d[:, None] * first0) * (t - d)[:, None] + z
  np.testing.assert_allclose(consistency_target(net, x, t, d, z, smallest=True),
                             (first0 + second0) / 2, rtol=1e-6)


POINT = jnp.array([0.7, -1.2, 0.3])


def exact_point_shortcut(x_t, time, z):
  """Data at one point c: every path is straight, s(x_t, t, d) = (x_t - c) / t for every d."""
  del z
  t = jnp.broadcast_to(time[0], x_t.shape[:1])
  return (x_t - POINT) / t[:, None]


def test_the_exact_shortcut_of_its_data_has_zero_loss_and_samples_in_one_step():
  head = Shortcut(token_dim=3, batch_mul=4, fraction=0.5, levels=5)
  x = jnp.broadcast_to(POINT, (64, 3))
  loss = head.loss(exact_point_shortcut, x, jnp.zeros((64, 1)), jax.random.PRNGKey(0))
  assert loss.shape == (64,)
  np.testing.assert_allclose(np.asarray(loss), 0.0, atol=1e-8)
  for steps in (1, 4):
    sample = head.sample(exact_point_shortcut, jnp.zeros((8, 1)), jax.random.PRNGKey(1),
                         steps=steps)
    np.testing.assert_allclose(np.asarray(sample), np.broadcast_to(POINT, (8, 3)), atol=1e-5)
  # A net that is not self-consistent across step sizes pays on the consistency draws.
  biased = lambda x_t, time, z: exact_point_shortcut(x_t, time, z) + time[1][:, None]
  assert float(head.loss(biased, x, jnp.zeros((64, 1)), jax.random.PRNGKey(0)).mean()) > 1e-3


def test_the_fraction_must_leave_both_kinds_of_draw():
  config = configs.load(str(REPO_ROOT / "configs/digits_shortcut.py:smoke"))
  registry.validate(config)
  config.head.shortcut_fraction = 0.9
  with pytest.raises(ConfigError, match="config.head.shortcut_fraction=0.9"):
    registry.validate(config)


@pytest.mark.parametrize("variant", ["smoke", "mar_smoke"])
def test_it_trains_and_samples_in_k_steps_through_the_family(variant):
  config = configs.load(str(REPO_ROOT / f"configs/digits_shortcut.py:{variant}"))
  registry.validate(config)
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, head, loss = registry.build_model(config, tok)
  assert head.consistency_draws == 1  # a quarter of batch_mul = 4
  family = registry.family(config)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *family.example_inputs(tok))["params"])
  tokens = jax.random.uniform(jax.random.PRNGKey(1), (4, tok.num_tokens, tok.token_dim),
                              minval=-1, maxval=1)
  args = (params, tokens, jnp.arange(4), jax.random.PRNGKey(2))
  if variant == "smoke":
    value, grads = jax.jit(jax.value_and_grad(loss))(*args)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  else:  # MAR's bucketed loss is slow to differentiate on CPU; its value is the head's loss
    value = jax.jit(loss)(*args)
  assert np.isfinite(float(value))
  config.sample.num_steps = 2
  if "kept_buckets" in config.sample:
    config.sample.kept_buckets = 1  # MAR: one encoder segment, one scan body to compile
  images = family.sampler(model, head, tok, config)(params, np.arange(3), jax.random.PRNGKey(3),
                                                    cfg_scale=2.0)
  assert images.shape == (3, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
  assert registry.head(config).evaluations_per_token(config) == 2
