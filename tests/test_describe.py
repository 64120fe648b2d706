"""`describe` and the hardware presets: its figures equal what the real init, the rules and the
bench FLOP count give; every preset is a valid config on exactly its hardware's devices."""
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import pytest

from arjax import registry
from arjax.perf import bench
from arjax.config import schema as configs
from arjax.perf import describe
from arjax.config import hardware
from arjax.parallel import sharding
from arjax.training.experiment import Experiment
from conftest import REPO_ROOT


def _load(name, **mesh):
  config = configs.load(str(REPO_ROOT / "configs" / name))
  if "shape" in mesh:
    config.mesh.shape = mesh["shape"]
  return config


@pytest.mark.parametrize("name", ["digits.py:smoke", "digits_mar.py:smoke"])
def test_parameters_and_state_shards_equal_the_real_sharded_init(name):
  """On a (data 2, fsdp 4) mesh of the 8 test devices: the parameter count is the real init's,
  and every per-device figure is what device 0 really holds of params and optimizer state."""
  config = _load(name, shape=(2, 4, 1))
  exp = Experiment(config)
  _, shardings = exp.abstract_state()  # what training lays the state out with
  # The model's real init (with a cheaper PRNG than the default threefry: sizes do not depend
  # on the values, and threefry's program takes seconds to compile).
  params = jax.jit(
      lambda rng: nn.meta.unbox(exp.model.init(rng, exp.example_tokens, exp.example_labels)["params"]),
      out_shardings=shardings.params)(jax.random.key(0, impl="unsafe_rbg"))
  opt_state = jax.jit(exp.optimizer.init, out_shardings=shardings.opt_state)(params)
  d = describe.state_figures(config, describe.abstract_tokenizer(config),
                             describe.mesh_sizes(config))

  assert d["parameters"] == sum(leaf.size for leaf in jax.tree.leaves(params))
  assert d["parameters_by_module"] == {
      module: sum(leaf.size for leaf in jax.tree.leaves(tree)) for module, tree in params.items()}
  on_device_0 = lambda tree: sum(leaf.addressable_shards[0].data.nbytes
                                 for leaf in jax.tree.leaves(tree))
  assert d["params_bytes"] == d["ema_bytes"] == on_device_0(params)
  assert d["params_bytes"] < d["params_bytes_unsharded"]  # something is sharded: it can fail
  assert d["optimizer_bytes"] == on_device_0(opt_state)


def test_a_parameter_sharded_over_fsdp_4_holds_a_quarter_per_device():
  config = _load("digits.py:smoke")
  params, _ = describe.abstract_trees(config, describe.abstract_tokenizer(config))
  rules = sharding.rules_from_config(config.sharding)
  fsdp = describe.leaf_shards(params, rules, {"data": 1, "fsdp": 4, "tensor": 1})
  replicated = describe.leaf_shards(params, rules, {"data": 4, "fsdp": 1, "tensor": 1})
  nbytes = lambda row: math.prod(row[5]) * row[2]
  sharded = [(a, b) for a, b in zip(fsdp, replicated) if "embed" in a[3]]  # rule embed -> fsdp
  others = [(a, b) for a, b in zip(fsdp, replicated) if "embed" not in a[3]]
  assert sharded and others
  assert all(4 * nbytes(a) == nbytes(b) for a, b in sharded)
  assert all(nbytes(a) == nbytes(b) for a, b in others)


def test_a_dimension_its_mesh_axes_do_not_divide_is_a_warning():
  config = _load("digits.py:smoke")  # width 32
  params, _ = describe.abstract_trees(config, describe.abstract_tokenizer(config))
  rules = sharding.rules_from_config(config.sharding)
  rows = lambda fsdp: describe.leaf_shards(params, rules, {"data": 1, "fsdp": fsdp, "tensor": 1})
  assert describe.divisibility_warnings(rows(4), {"data": 1, "fsdp": 4, "tensor": 1}) == []
  (warning,) = describe.divisibility_warnings(rows(3), {"data": 1, "fsdp": 3, "tensor": 1})
  assert "'embed' of size 32" in warning and "fsdp=3" in warning


def test_mesh_takes_num_devices_for_its_minus_one_entry_and_checks_them():
  config = _load("digits.py")  # mesh (-1, 1, 1)
  assert describe.mesh_sizes(config, 4) == {"data": 4, "fsdp": 1, "tensor": 1}
  assert describe.mesh_sizes(config) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  # A fixed mesh describes itself, whatever this machine has.
  assert describe.mesh_sizes(_load("digits.py", shape=(4, 16, 1)))["fsdp"] == 16
  with pytest.raises(configs.ConfigError, match="--num_devices=12"):
    describe.mesh_sizes(_load("digits.py", shape=(1, 8, 1)), 12)


def _mar_with_tiny_vae():
  """digits_mar's smoke model on 64px RGB images through the tiny KL VAE, whose weights
  (config.tokenizer.checkpoint) are not given: describe must not need them."""
  config = _load("digits_mar.py:smoke")
  config.data.image_size, config.data.channels = 64, 3
  config.tokenizer = ml_collections.ConfigDict(dict(
      name="kl_vae", checkpoint=ml_collections.config_dict.placeholder(str),
      architecture="kl16_tiny", patch_size=1, latent_scale=0.2325, sample_posterior=True))
  registry.validate(config)
  return config


def test_flops_are_the_bench_analytic_count_and_need_no_vae_weights():
  config = _mar_with_tiny_vae()
  config.train.global_batch_size = 24
  d = describe.flop_figures(config)
  assert d["flops_train_step"] == bench.analytic_flops(config, "train", 24)
  # Per image at the config's sampling batch (the head's time MLP runs once per net call for
  # the whole batch, so a batch of 1 would pay it alone).
  batch = config.sample.batch_size
  whole = bench.analytic_flops(config, "sample", batch)
  assert d["flops_per_sampled_image"] == {k: v // batch for k, v in whole.items()}
  assert (bench.analytic_flops(config, "sample", 2 * batch)["total"] / (2 * batch)
          < d["flops_per_sampled_image"]["total"] <= bench.analytic_flops(config, "sample", 1)["total"])


def test_activations_extrapolated_from_depths_1_and_2_equal_the_full_trace():
  config = _load("digits.py:smoke")
  config.model.depth, config.head.depth = 4, 3
  tokenizer = describe.abstract_tokenizer(config)
  sizes = {"data": 1, "fsdp": 4, "tensor": 1}  # the batch of 16 over 4 devices: 4 rows each
  estimate = describe.activation_bytes(config, tokenizer,
                                       sharding.rules_from_config(config.sharding), sizes)
  full_trace = describe._residual_bytes(config, tokenizer, rows=4)  # pylint: disable=protected-access
  assert estimate["total"] == full_trace
  assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")


PRESET_FILES = ["imagenet256.py", "imagenet256_mar_base.py", "imagenet256_mar_large.py",
                "imagenet256_mar_huge.py"]


@pytest.mark.parametrize("name", PRESET_FILES)
@pytest.mark.parametrize("slice_name", list(hardware.HARDWARE))
def test_every_preset_validates_on_exactly_its_hardware(name, slice_name):
  recipe = _load(name)
  config = _load(f"{name}:{slice_name}")
  registry.validate(config)
  data, fsdp, tensor = config.mesh.shape
  assert data * fsdp * tensor == hardware.HARDWARE[slice_name].devices
  assert config.train.global_batch_size % (data * fsdp) == 0
  assert config.model.dtype == "bfloat16"
  # A changed batch keeps the recipe's schedule in images.
  ratio = config.train.global_batch_size / recipe.train.global_batch_size
  assert config.train.learning_rate == pytest.approx(recipe.train.learning_rate * ratio)
  assert config.train.num_steps * ratio == pytest.approx(recipe.train.num_steps, rel=1e-4)
  assert config.train.ema_decay ** (1 / ratio) == pytest.approx(recipe.train.ema_decay)


@pytest.mark.parametrize("name", PRESET_FILES)
def test_an_unknown_variant_fails_naming_the_known_ones(name):
  with pytest.raises(ValueError, match=rf"configs/{name} has no variant 'v5p-64'; known: .*"
                                       r"'v5p-32', 'v5p-128', 'h100x8'"):
    _load(f"{name}:v5p-64")


def test_cli_describes_the_mar_base_preset_on_8_h100():
  result = subprocess.run(
      [sys.executable, "-m", "arjax", "describe",
       "--config=configs/imagenet256_mar_base.py:h100x8"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "describe configs/imagenet256_mar_base.py:h100x8" in out
  assert "data 1 x fsdp 8 x tensor 1 = 8 devices; global batch 512 = 64 per device" in out
  assert "parameters   207.9M: backbone 172.2M, head 35.75M; tokenizer" in out  # MAR-B: 208M
  for field in ("model", "tokens", "FLOPs        train step", "sampled image", "params",
                "EMA", "gradients", "optimizer", "activations", "tokenizer", "total"):
    assert f"  {field} " in out, field
  assert "warning" not in out
