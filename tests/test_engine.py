"""The serving engines (arjax/serving/engine.py) in-process, on the shared smoke workdir.

What the slot engine promises: an image served with (class, seed, index, settings) is the
image the family's sampler draws for the same, whoever else shares the slots and whenever it
joined; requests coming and going compile nothing; a request that times out frees its slots;
a family without slots falls back to one request at a time, saying so.
"""
import threading
import time

import jax
import numpy as np
import pytest

from arjax.config import schema as configs
from arjax.data import pipeline
from arjax.parallel import sharding
from arjax.serving import engine as engine_lib
from arjax.serving import jobs as jobs_lib
from arjax.serving import metrics as metrics_lib
from arjax.training.experiment import Experiment
from conftest import REPO_ROOT

TRACES = engine_lib.TraceCounter()  # one listener for the module


@pytest.fixture(scope="module")
def served(smoke_run):
  config, _, state = smoke_run
  exp = Experiment(config.copy_and_resolve_references())
  return exp, state.ema_params


def make_slot_engine(served, slots, **settings):
  exp, params = served
  engine = engine_lib.SlotEngine(exp.family, exp.sampler(), params,
                                 engine_lib.EngineSettings(slots=slots, **settings),
                                 metrics_lib.ServerMetrics(), TRACES)
  engine.start()
  return engine


def submit(engine, labels, *, seed=0, cfg_scale=3.0, cfg_schedule="linear", temperature=1.0,
           num_steps=2, timeout_s=120.0):
  job = engine.new_job(labels=np.asarray(labels), seed=seed, cfg_scale=cfg_scale,
                       cfg_schedule=cfg_schedule, temperature=temperature,
                       num_steps=num_steps, timeout_s=timeout_s)
  engine.submit(job)
  return job


def wait(job, until=lambda job: job.is_final(), timeout=120):
  deadline = time.monotonic() + timeout
  with job.changed:
    while not until(job):
      assert time.monotonic() < deadline, f"{job.id}: {job.status}, {job.num_done} done"
      job.changed.wait(0.1)


def sampler_images(served, job):
  """What the family's sampler draws for the job's request (the `sample` command's call)."""
  exp, params = served
  images = exp.sampler()(params, job.labels, jax.random.PRNGKey(job.seed),
                         cfg_scale=job.cfg_scale, cfg_schedule_name=job.cfg_schedule,
                         temperature=job.temperature)
  return pipeline.denormalize(sharding.to_host(images))


def assert_same_images(job, expected):
  # tests/test_determinism.py's bound: float reduction order may flip a rounding (1 level).
  got = np.stack(job.images)
  assert got.shape == expected.shape
  assert np.abs(got.astype(int) - expected).max() <= 1
  assert np.mean(got == expected) > 0.99


def test_images_joining_mid_decode_are_the_samplers_images(served):
  engine = make_slot_engine(served, slots=4)
  try:
    # 14 images in 4 slots: ten wait for slots that free up (eviction, then reuse), and
    # `first` is still decoding rounds later, when the others join.
    first = submit(engine, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], seed=7, cfg_scale=2.0)
    wait(first, until=lambda job: job.num_done >= 1)
    # Joins while `first` is mid-decode, with other settings, unguided, constant ramp.
    second = submit(engine, [2, 7, 2], seed=11, cfg_scale=1.0, cfg_schedule="constant",
                    temperature=0.8)
    third = submit(engine, [0], seed=7, cfg_scale=2.0)  # `first`'s seed, another index 0
    for job in (first, second, third):
      wait(job)
      assert job.status == jobs_lib.DONE, job.error
    assert second.started < first.finished  # really joined mid-decode
    for job in (first, second, third):
      assert_same_images(job, sampler_images(served, job))
    # The draws differ between images, so the comparisons above can fail.
    assert not np.array_equal(first.images[1], first.images[3])  # same class, other index
    assert engine.live_slots() == 0
  finally:
    engine.shutdown(log=lambda _: None)


def test_a_burst_of_mixed_requests_compiles_nothing(served):
  engine = make_slot_engine(served, slots=8)
  try:
    engine.warm_up((0, 0, 3.0, "linear", 1.0))
    before = TRACES.count
    rng = np.random.default_rng(0)
    jobs = []

    def client(k):
      jobs.append(submit(engine, rng.integers(0, 10, size=1 + k % 5), seed=k,
                         cfg_scale=(1.0, 1.6, 3.0)[k % 3],
                         cfg_schedule=("constant", "linear")[k % 2],
                         temperature=(0.9, 1.0, 1.15)[k % 3]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for job in jobs:
      wait(job)
      assert job.status == jobs_lib.DONE and all(im is not None for im in job.images)
    assert TRACES.count == before, "requests coming and going compiled something"
    assert engine.metrics.images_total == sum(job.count for job in jobs)
  finally:
    engine.shutdown(log=lambda _: None)


def test_a_request_that_times_out_frees_its_slots(served):
  engine = make_slot_engine(served, slots=2)
  try:
    slow = submit(engine, [5] * 200, timeout_s=0.3)  # 100 rounds of the 2 slots: too long
    wait(slow)
    assert slow.status == jobs_lib.TIMED_OUT and "timed out after 0.3 s" in slow.error
    assert slow.num_done < slow.count
    after = submit(engine, [1, 2], seed=3)
    wait(after)
    assert after.status == jobs_lib.DONE
    assert_same_images(after, sampler_images(served, after))
    assert engine.live_slots() == 0 and engine.queue_length() == 0
  finally:
    engine.shutdown(log=lambda _: None)


def test_a_full_queue_refuses_and_shutdown_rejects_what_has_not_started(served):
  engine = make_slot_engine(served, slots=1, queue_size=2, shutdown_grace_s=60.0)
  running = submit(engine, [4] * 30)  # 30 rounds of its one slot
  wait(running, until=lambda job: job.status == jobs_lib.RUNNING)
  waiting = submit(engine, [6])  # running (partly admitted) and waiting fill the queue of 2
  with pytest.raises(engine_lib.QueueFull, match="--queue_size=2"):
    submit(engine, [7])
  said = []
  engine.shutdown(log=said.append)
  assert waiting.status == jobs_lib.REJECTED and "had not started" in waiting.error
  assert running.status == jobs_lib.DONE  # finished within the grace time
  assert said[0].startswith("shutdown: rejected 1 queued request(s); finishing 1 running")
  with pytest.raises(engine_lib.ShuttingDown):
    submit(engine, [7])


@pytest.mark.parametrize("name", ["sequential", "per_request"])
def test_one_request_at_a_time_draws_the_same_images(served, name):
  # The comparison engines of benchmarks/serve_load.py: a padded 16-image batch, or the
  # power of two that fits (4 for 3 images); the images are the slot engine's and sample's.
  exp, params = served
  engine = engine_lib.SequentialEngine(exp.sampler(), params,
                                       engine_lib.EngineSettings(engine=name),
                                       metrics_lib.ServerMetrics(), TRACES)
  engine.start()
  try:
    job = submit(engine, [8, 0, 8], seed=5, cfg_scale=2.0)
    wait(job)
    assert job.status == jobs_lib.DONE and engine.name == name
    assert_same_images(job, sampler_images(served, job))
  finally:
    engine.shutdown(log=lambda _: None)


def test_a_family_without_slots_is_served_one_request_at_a_time():
  exp = Experiment(configs.load(str(REPO_ROOT / "configs/digits_mar.py:smoke")))
  said = []
  engine = engine_lib.make_engine(exp, None, engine_lib.EngineSettings(),
                                  metrics_lib.ServerMetrics(), TRACES, log=said.append)
  assert isinstance(engine, engine_lib.SequentialEngine)
  assert said == ["serve: config.model.family='mar' has no slot decoder "
                  "(Family.slot_decoder): serving one request at a time (--engine=per_request)"]
  assert engine.name == "per_request"


@pytest.mark.parametrize("settings, says", [
    ({"slots": 0}, "--slots=0: an integer >= 1"),
    ({"queue_size": 2.5}, "--queue_size=2.5: an integer >= 1"),
    ({"engine": "fast"}, "--engine='fast': one of 'slots', 'sequential', 'per_request'"),
    ({"request_timeout_s": 0}, "--request_timeout=0: seconds > 0"),
])
def test_engine_settings_are_checked(settings, says):
  with pytest.raises(ValueError, match=f"^{__import__('re').escape(says)}"):
    engine_lib.EngineSettings(**settings)


def test_the_recurrent_family_serves_in_slots_through_the_causal_hook():
  """The recurrent family inherits the causal family's slot decoder: its decode state (the
  recurrent state and, in the hybrid, the current chunk's keys and values) is the slot's
  cache. The hybrid carries both kinds of state."""
  exp = Experiment(configs.load(str(REPO_ROOT / "configs/digits_recurrent.py:hybrid_smoke")))
  state, _ = exp.init_state()
  served = (exp, state.params)
  engine = make_slot_engine(served, slots=2)
  try:
    job = submit(engine, [4, 0, 9, 4, 2], seed=3, cfg_scale=2.0)
    wait(job)
    assert job.status == jobs_lib.DONE, job.error
    assert_same_images(job, sampler_images(served, job))
  finally:
    engine.shutdown(log=lambda _: None)
