"""Scan decoding with the KV cache is the teacher-forced causal forward pass, step by step."""
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.families.causal.model import ARModel
from arjax.families.causal.sampler import sample_tokens
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def built():
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  config.model.num_class_tokens = 2
  tok = registry.make_tokenizer(config.tokenizer, config.data)
  model, head, _ = registry.build_model(config, tok)
  x = jnp.zeros((1, tok.num_tokens, tok.token_dim))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x, jnp.zeros((1,), jnp.int32))["params"])
  # The head's output layers start at zero; perturb every parameter so all of them matter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, head, tok, params


def _relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("guided", [False, True])
def test_cached_decoding_matches_teacher_forced_forward(built, guided):
  model, head, tok, params = built
  labels = jnp.array([0, 3, 7, 9])
  run = jax.jit(functools.partial(sample_tokens, model=model, head=head, guided=guided, num_steps=3,
                                  num_tokens=tok.num_tokens))
  tokens, z_decoded = run(params, labels, jax.random.PRNGKey(0),
                          jnp.full((tok.num_tokens,), 2.0), jnp.float32(1.0))
  assert tokens.shape == (4, tok.num_tokens, tok.token_dim)
  all_labels = jnp.concatenate([labels, jnp.full_like(labels, 10)]) if guided else labels
  fed = jnp.concatenate([tokens, tokens]) if guided else tokens
  z_forward = model.apply({"params": params}, fed, all_labels, method=ARModel.condition)
  assert z_decoded.shape == z_forward.shape
  assert _relative_error(z_decoded, z_forward) <= 1e-5


def test_backbone_is_causal(built):
  model, _, tok, params = built
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(2, tok.num_tokens, tok.token_dim)), jnp.float32)
  labels = jnp.array([1, 2])
  condition = jax.jit(lambda x: model.apply({"params": params}, x, labels, method=ARModel.condition))
  z = condition(tokens)
  for t in (0, 5, tok.num_tokens - 1):
    z_perturbed = condition(tokens.at[:, t].add(1.0))
    # z_i conditions token i and may only see tokens < i: positions <= t are untouched...
    np.testing.assert_array_equal(np.asarray(z_perturbed[:, : t + 1]), np.asarray(z[:, : t + 1]))
    # ...and the perturbation does reach later positions (the test can fail).
    if t + 1 < tok.num_tokens:
      assert float(jnp.max(jnp.abs(z_perturbed[:, t + 1:] - z[:, t + 1:]))) > 1e-4


def test_class_conditioning_reaches_every_position(built):
  model, _, tok, params = built
  tokens = jnp.zeros((1, tok.num_tokens, tok.token_dim))
  z_a = model.apply({"params": params}, tokens, jnp.array([1]), method=ARModel.condition)
  z_b = model.apply({"params": params}, tokens, jnp.array([2]), method=ARModel.condition)
  assert bool(jnp.all(jnp.max(jnp.abs(z_a - z_b), axis=-1) > 1e-4))
