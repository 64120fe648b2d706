"""DiSA head-step annealing: a schedule of head steps along the generation order.

The constant schedule is the plain sampler bit for bit; a schedule changes a token only from
the first unit whose step count it changes on (the causal order), changes the head
evaluations that `bench` and `describe` report as documented, and compiles one program per
schedule, whatever the seed or guidance scale of a call.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax import registry
from arjax.config import schema as configs
from arjax.errors import ConfigError
from arjax.perf import bench
from arjax.sampling import step_schedule
import family_testing
from conftest import REPO_ROOT


def test_linear_and_cosine_run_from_num_steps_to_head_steps_end():
  assert step_schedule.head_steps("linear", 50, 5, 10) == (50, 45, 40, 35, 30, 25, 20, 15, 10, 5)
  cosine = step_schedule.head_steps("cosine", 16, 4, 9)
  assert cosine[0] == 16 and cosine[-1] == 4 and cosine[4] == 10
  assert all(a >= b for a, b in zip(cosine, cosine[1:]))
  # The cosine eases out of both ends: its first drop is smaller than the linear ramp's.
  assert cosine[0] - cosine[1] < 16 - step_schedule.head_steps("linear", 16, 4, 9)[1]
  assert step_schedule.head_steps("constant", 7, 1, 3) == (7, 7, 7)
  assert step_schedule.head_steps((3, 2, 1), 7, 1, 3) == (3, 2, 1)
  assert step_schedule.head_steps("linear", 8, 2, 1) == (8,)  # one unit: the first count


def test_runs_are_the_maximal_stretches_of_equal_counts():
  assert step_schedule.runs((4, 4, 3, 3, 3, 4)) == [(0, 2, 4), (2, 5, 3), (5, 6, 4)]
  assert step_schedule.runs(("100",) * 3) == [(0, 3, "100")]
  assert step_schedule.split_at_runs([(0, 3), (3, 5)], (2, 2, 1, 1, 1)) == [
      (0, 2, 2), (2, 3, 1), (3, 5, 1)]


@pytest.mark.parametrize("schedule, end, message", [
    ("quadratic", 4, "sample.head_step_schedule='quadratic'"),
    ("linear", 0, "sample.head_steps_end=0"),
    ((3, 0, 1), 4, "sample.head_step_schedule[1]=0"),
    ((3, 2), 4, "has 2 step counts; this sampler's generation order has 3 units"),
])
def test_bad_schedules_fail_naming_the_field(schedule, end, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    step_schedule.head_steps(schedule, 8, end, 3)


def test_the_config_schema_checks_the_schedule_fields():
  config = configs.load(str(REPO_ROOT / "configs/digits.py:smoke"))
  registry.validate(config)
  config.sample.head_step_schedule = "steep"
  with pytest.raises(ConfigError, match="config.sample.head_step_schedule='steep'"):
    registry.validate(config)
  config.sample.head_step_schedule = "2,-1"
  with pytest.raises(ConfigError, match="config.sample.head_step_schedule='2,-1'"):
    registry.validate(config)
  config.sample.head_step_schedule = "2,2,1"  # explicit counts, as sample.labels lists labels
  registry.validate(config)
  assert step_schedule.parse(config.sample.head_step_schedule) == (2, 2, 1)


def _built(config_name):
  config = configs.load(str(REPO_ROOT / config_name))
  return (config, *family_testing.built_with_perturbed_params(config))


def _sampler(built, **sample):
  config, tok, model, head, _ = built
  config = config.copy_and_resolve_references()
  config.sample.update(sample)
  return registry.family(config).sampler(model, head, tok, config)


LABELS = np.array([0, 3, 7, 9])
CASES = {"causal": "configs/digits.py:smoke", "mar": "configs/digits_mar.py:smoke",
         "xar": "configs/digits_xar.py:smoke"}  # xAR: one unit per entity


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
  return _built(CASES[request.param])


def test_a_constant_schedule_is_the_plain_sampler_bit_for_bit(built):
  params, n = built[-1], built[0].sample.num_steps
  plain = _sampler(built)
  units = len(registry.family(built[0]).head_units(built[0], built[1]))
  spelled_out = _sampler(built, head_step_schedule=",".join([str(n)] * units))
  flat_ramp = _sampler(built, head_step_schedule="linear", head_steps_end=n)
  rng = jax.random.PRNGKey(5)
  want = np.asarray(plain(params, LABELS, rng, cfg_scale=2.0))
  for sampler in (spelled_out, flat_ramp):
    np.testing.assert_array_equal(np.asarray(sampler(params, LABELS, rng, cfg_scale=2.0)), want)


def test_a_schedule_changes_tokens_from_its_first_change_on():
  built = _built(CASES["causal"])
  config, tok, model, head, params = built
  n, length = config.sample.num_steps, tok.num_tokens
  change = length // 2
  annealed = _sampler(built, head_step_schedule=",".join(
      [str(n)] * change + ["1"] * (length - change)))
  from arjax.families.causal.sampler import sample_tokens  # the tokens, before decoding
  run = lambda sampler: sample_tokens(
      params, jnp.asarray(LABELS), jax.random.PRNGKey(5), jnp.ones((length,)), jnp.float32(1.0),
      model=model, head=sampler.head_for_sampling, guided=False, num_steps=n,
      num_tokens=length, head_steps=sampler.head_steps(length))[0]
  plain, fewer = np.asarray(run(_sampler(built))), np.asarray(run(annealed))
  np.testing.assert_array_equal(fewer[:, :change], plain[:, :change])
  assert np.abs(fewer[:, change] - plain[:, change]).min() > 0


def test_the_schedule_sets_the_head_evaluations_and_flops():
  config = configs.load(str(REPO_ROOT / "configs/digits.py"))  # 16 positions, Heun, 16 steps
  assert bench.head_evaluations(config) == 2 * 16 - 1
  plain_head = registry.flops(config, "sample", 8)["head"]
  config.sample.head_step_schedule = "linear"
  config.sample.head_steps_end = 1
  steps = step_schedule.head_steps("linear", 16, 1, 16)
  assert steps[0] == 16 and steps[-1] == 1
  # Heun: 2n - 1 evaluations at a position with n steps, averaged over the 16 positions.
  assert bench.head_evaluations(config) == pytest.approx(np.mean([2 * n - 1 for n in steps]),
                                                         abs=1e-3)
  assert registry.flops(config, "sample", 8)["head"] == pytest.approx(
      plain_head * np.mean([2 * n - 1 for n in steps]) / 31, rel=0.02)
  mar = configs.load(str(REPO_ROOT / "configs/digits_mar.py"))
  mar.sample.head_step_schedule = "linear"
  mar.sample.head_steps_end = 1
  units = registry.family(mar).head_steps(
      mar, registry.make_tokenizer(mar.tokenizer, mar.data, abstract=True))
  per_token = sum(t * registry.head(mar).evaluations_per_token(mar, n) for t, n in units) / sum(
      t for t, _ in units)
  assert bench.head_evaluations(mar) == pytest.approx(per_token, abs=1e-3)


def test_one_program_per_schedule_whatever_the_call():
  built = _built(CASES["causal"])
  params = built[-1]
  sampler = _sampler(built, head_step_schedule="linear", head_steps_end=1)
  for seed, scale in ((0, 2.0), (1, 3.0), (2, 1.5)):
    sampler(params, LABELS, jax.random.PRNGKey(seed), cfg_scale=scale)
  assert list(sampler._programs) == [True]
  assert sampler._programs[True]._cache_size() == 1
