"""The rules table shards activations too: the compiled train step and sampler carry the
constraints the layers ask for (heads and MLP hidden over 'tensor', batch over data x fsdp).

Read from the lowered module text (Shardy's `sdy.sharding_constraint`), on 8 CPU devices with
mesh (data 4, fsdp 1, tensor 2). That a sharded step still equals the single-device step is
tests/test_sharding.py's and tests/test_mar_train.py's (both on tensor-parallel meshes).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax.training import step as train_step
from arjax.training.experiment import Experiment

from conftest import REPO_ROOT

CONFIGS = {"causal": "configs/digits.py:smoke", "mar": "configs/digits_mar.py:smoke"}
MESH = (4, 1, 2)
# [batch, length, heads, head_dim]: queries/keys/values; [batch, length, hidden]: the MLP's.
HEADS_SPLIT = '[{"data", "fsdp"}, {}, {"tensor"}, {}]'
HIDDEN_SPLIT = '[{"data", "fsdp"}, {}, {"tensor"}]'


def _experiment(family):
  config = configs.load(str(REPO_ROOT / CONFIGS[family]))
  config.mesh.shape = MESH
  config.train.global_batch_size = 8
  return Experiment(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:8]))


def _constraints(text):
  return re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])>", text)


def _lowered_step(exp, jit_step):
  abstract, shardings = exp.abstract_state()
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  return jit_step(shardings).lower(abstract, batch).as_text()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_train_step_shards_attention_and_mlp_activations_as_the_rules_say(family):
  exp = _experiment(family)
  found = _constraints(_lowered_step(exp, exp.jit_step))
  assert HEADS_SPLIT in found and HIDDEN_SPLIT in found, sorted(set(found))
  # The blocks' residual stream: batch split, the features whole (fsdp already serves the batch).
  assert '[{"data", "fsdp"}, {}, {}]' in found


def test_without_the_rules_the_same_step_has_no_activation_constraints():
  """What the layers' constraints did before the rules reached them: nothing."""
  exp = _experiment("causal")
  unconstrained = lambda shardings: jax.jit(
      lambda state, batch: train_step.train_step(
          state, batch, loss_fn=exp.loss_fn, tokenizer=exp.tokenizer, optimizer=exp.optimizer,
          config=exp.config),
      in_shardings=(shardings, sharding.batch_sharding(exp.mesh)))
  assert _constraints(_lowered_step(exp, unconstrained)) == []


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_sampler_shards_activations_and_leaves_an_odd_batch_whole(family):
  exp = _experiment(family)
  params = exp.abstract_state()[0].params
  sampler = exp.sampler()
  # 4 images with CFG: 8 rows over data x fsdp = 4 devices.
  even = jax.jit(lambda p: sampler(p, np.arange(4), jax.random.PRNGKey(0), cfg_scale=2.0))
  found = _constraints(even.lower(params).as_text())
  assert HEADS_SPLIT in found, sorted(set(found))
  # 3 images, no CFG: 3 rows do not split 4 ways; heads still do.
  odd = jax.jit(lambda p: sampler(p, np.arange(3), jax.random.PRNGKey(0)))
  found = _constraints(odd.lower(params).as_text())
  assert '[{}, {}, {"tensor"}, {}]' in found and HEADS_SPLIT not in found, sorted(set(found))
