"""Command line: python -m arjax train|sample|eval --config=configs/X.py --workdir=DIR

    python -m arjax bench --config=configs/X.py --mode=train|sample|decode [--batch=N] [--repeats=N]
        [--warmup=N] [--profile=DIR] [--out=FILE] [--workdir=DIR]

times the jitted train step or sampler (see `arjax.perf.bench`); it needs no
workdir, and writes its JSON report to --out, else workdir/bench_<mode>.json
if --workdir is given, else prints only.

    python -m arjax cache_latents --config=configs/X.py [--out=DIR] [--split=SPLIT] [--batch=N]

encodes the config's TFDS split (default config.data.train_split) and each image's horizontal
flip with its VAE tokenizer into an ArrayRecord latent cache in --out (default
config.data.latents); training reads it with --config.data.latents=DIR (see
`arjax.data.latents`).

    python -m arjax convert --source=CHECKPOINT --out=DIR [--config=configs/X.py]
        [--kind=mar|xar|vae|inception]

imports an official MAR checkpoint-last.pth (params, EMA) or kl16.ckpt (VAE), the FID
Inception-v3's pt_inception-2015-12-05-*.pth, or a file of any converter a family or
tokenizer registers, into DIR; see `arjax.convert.official` and the
README.

    python -m arjax fid_stats --config=configs/X.py --inception=DIR [--split=SPLIT]
        [--out=FILE.npz] [--batch=N]

streams the config's TFDS split (default config.data.train_split) through the FID
Inception-v3 in DIR (from `convert --kind=inception`) and writes the pool3 mean and covariance
that FID compares samples against (see `arjax.commands.fid_stats`); cached by dataset, split,
size and weights.

    python -m arjax describe --config=configs/X.py [--num_devices=N]

prints the config's parameters, FLOPs per train step and per sampled image, and memory per
device on its mesh, without compiling anything (see `arjax.perf.describe`).

    python -m arjax serve --workdir=DIR [--config=configs/X.py] [--port=8000] [--host=127.0.0.1]
        [--engine=slots|sequential|per_request] [--slots=32] [--queue_size=64] [--request_timeout=300]

serves a demo page and a JSON API on http://HOST:PORT/ (class, count, CFG, temperature, steps,
seed -> images) from DIR's newest checkpoint, many requests at once by continuous batching of
decode steps; the config defaults to DIR/config.json (see `arjax.serving.server`).

Multi-host (train, sample, eval; see `arjax.parallel.distributed`): every process of the job runs the
same command, plus `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
ARJAX_* environment variables); on TPU pods and under SLURM `srun` the three are detected.

Config fields are overridden on the command line, e.g. `--config.model.depth=4`
or `--config.sample.cfg_scale=2.0`; unknown fields fail at start.
"""
import json
import os
import shlex
import sys

from arjax.parallel import host_allocator

# Before anything can start JAX (config files import it): see arjax/parallel/host_allocator.py.
host_allocator.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

COMMANDS = ("train", "sample", "eval", "bench", "cache_latents", "convert", "describe", "serve",
            "fid_stats")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py[:smoke].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
# bench only.
_MODE = flags.DEFINE_enum("mode", None, ["train", "sample", "decode"],
                          "bench: what to time (decode: the causal sampler's per-token step).")
_BATCH = flags.DEFINE_integer(
    "batch", None, "bench: batch size; default config.train.global_batch_size (train) or "
    "config.sample.batch_size (sample). cache_latents, fid_stats: images per encoding / "
    "Inception call; default 32 per device.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "bench: timed calls.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "bench: untimed calls after the first (compiling) one.")
_PROFILE = flags.DEFINE_string("profile", None, "bench: write a jax.profiler trace of the timed "
                               "calls to this directory.")
_OUT = flags.DEFINE_string("out", None, "bench: JSON report path; default workdir/bench_<mode>.json. "
                           "cache_latents: the cache directory; default config.data.latents. "
                           "fid_stats: the statistics file; default "
                           "<data_dir>/arjax_fid_stats/<dataset>_<split>_<size>px.npz.")
_INCEPTION = flags.DEFINE_string("inception", None, "fid_stats: the FID Inception-v3 weights "
                                 "`convert --kind=inception` wrote (its --out directory).")
_SPLIT = flags.DEFINE_string("split", None, "cache_latents, fid_stats: the split to read; default "
                             "config.data.train_split.")

# convert only; --out is its output directory.
_SOURCE = flags.DEFINE_string("source", None, "convert: the official checkpoint "
                              "(.pth/.ckpt, read without running code; .npz, .safetensors).")
# A string, not an enum: the kinds are the registered converters, plug-ins' included.
_KIND = flags.DEFINE_string(
    "kind", None, "convert: what --source holds: mar, vae, inception (the FID Inception-v3), or "
    "a plug-in's converter; default: "
    "detected from its parameter names.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "describe: devices of the mesh, filling a "
                                    "-1 in config.mesh.shape; default jax.device_count().")
# serve only.
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on (loopback: "
                            "this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "serve: the port to listen on; 0 = any free one.")
_ENGINE = flags.DEFINE_string("engine", "slots", "serve: 'slots' (continuous batching of decode "
                              "steps), 'sequential' (one request at a time, padded 16-image batches: the server before "
                              "slots) or 'per_request' (one at a time, batches fitted to each).")
_SLOTS = flags.DEFINE_integer("slots", 32, "serve: batch slots of the slot engine (images "
                              "drawn at once).")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", 64, "serve: requests that may wait for a slot; "
                                   "one more gets a 429.")
_REQUEST_TIMEOUT = flags.DEFINE_float("request_timeout", 300.0, "serve: seconds a request may "
                                      "take (its default and largest timeout_s).")
_SHUTDOWN_GRACE = flags.DEFINE_float("shutdown_grace", 60.0, "serve: on SIGTERM, seconds the "
                                     "running requests may take to finish.")

# Multi-host: all three or none (then ARJAX_* env, then TPU-pod / SLURM auto-detection).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of "
                                   "process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index.")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m arjax {{{'|'.join(COMMANDS)}}} --config=... --workdir=...")
  if argv[1] == "convert":
    # --source and --out; --config is optional (MAR default: imagenet256_mar_base), no workdir.
    logging.set_verbosity(logging.WARNING)
    from arjax.convert import official
    return official.run_cli(_SOURCE.value, _OUT.value, _CONFIG.value, _KIND.value)
  if argv[1] == "describe":
    if _CONFIG.value is None:
      raise app.UsageError("describe: --config is required")
  elif argv[1] == "bench":
    if _CONFIG.value is None or _MODE.value is None:
      raise app.UsageError("bench: --config and --mode=train|sample|decode are required")
  elif argv[1] == "cache_latents":
    if _CONFIG.value is None or (_OUT.value is None and _CONFIG.value.data.get("latents") is None):
      raise app.UsageError("cache_latents: --config and --out=DIR (or config.data.latents) "
                           "are required")
  elif argv[1] == "serve":
    if _WORKDIR.value is None:
      raise app.UsageError("serve: --workdir is required")
  elif argv[1] == "fid_stats":
    if _CONFIG.value is None or _INCEPTION.value is None:
      raise app.UsageError("fid_stats: --config and --inception=DIR (from `convert "
                           "--kind=inception`) are required")
  elif _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  command, config, workdir = argv[1], _CONFIG.value, _WORKDIR.value
  logging.set_verbosity(logging.WARNING)

  from arjax.config import schema as configs  # imported late: `--help` stays instant

  from arjax import registry
  from arjax.errors import InputFileError
  from arjax.parallel import distributed

  try:
    if command == "serve" and config is None:  # the config the workdir was trained with
      from arjax.serving import server as serve
      config = serve.workdir_config(workdir)
    registry.load_plugins()  # $ARJAX_PLUGINS: users' own families, heads, tokenizers
    registry.validate(config)
    coords = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    distributed.initialize(coords)
    _run(command, config, workdir)
  except (configs.ConfigError, InputFileError, FileNotFoundError, OSError,
          distributed.SetupError) as e:
    # Mistakes a user can fix: one line naming the field or path, no traceback.
    sys.exit(f"error: {e}")


def _run(command, config, workdir):
  import jax
  from arjax.training.experiment import Experiment

  if command == "train":
    from arjax.training import loop as train
    state = train.train_and_evaluate(config, workdir)
    print(f"trained to step {int(jax.device_get(state.step))}; checkpoints in {workdir}/checkpoints"
          f"; curves {workdir}/train_curves.png")
  elif command == "sample":
    from arjax.commands import sample as generate
    result = generate.run(Experiment(config), workdir)
    print(f"{result['num_images']} samples from step {result['step']}: {result['npz']}\n"
          f"grid: {result['png']}\nlabelled grid: {result['labelled_png']}")
  elif command == "eval":
    from arjax.commands import eval as evaluate_cli
    report = evaluate_cli.run(config, workdir)
    print(report)
  elif command == "cache_latents":
    from arjax.data import latents
    out = _OUT.value or config.data.latents
    meta = latents.cache_latents(config, out, split=_SPLIT.value, batch_size=_BATCH.value,
                                 progress=True)
    print(f"{meta['num_examples']} {meta['split']!r} images (and their flips) of "
          f"{meta['dataset']!r} cached in {out}\n"
          f"train on them: --config.data.latents={out}")
  elif command == "fid_stats":
    from arjax.commands import fid_stats
    print(fid_stats.run(config, _INCEPTION.value, split=_SPLIT.value, out=_OUT.value,
                        batch_size=_BATCH.value))
  elif command == "serve":
    from arjax.errors import ConfigError
    from arjax.serving import engine as serve_engine
    from arjax.serving import server as serve
    try:
      settings = serve_engine.EngineSettings(
          engine=_ENGINE.value, slots=_SLOTS.value, queue_size=_QUEUE_SIZE.value,
          request_timeout_s=_REQUEST_TIMEOUT.value, shutdown_grace_s=_SHUTDOWN_GRACE.value)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    serve.run(Experiment(config), workdir, host=_HOST.value, port=_PORT.value,
              settings=settings)
  elif command == "describe":
    from arjax.perf import describe
    print(describe.format_table(config, describe.describe(config, _NUM_DEVICES.value),
                                flags.FLAGS["config"].config_filename))
  elif command == "bench":
    from arjax.perf import bench
    path = bench.report_path(_MODE.value, _OUT.value, workdir)
    if path is not None:
      # Fail before minutes of compiling and timing, not after.
      from arjax.training.workdir import check_workdir
      check_workdir(os.path.dirname(os.path.abspath(path)))
    report = bench.run(
        config, mode=_MODE.value, batch_size=_BATCH.value, repeats=_REPEATS.value,
        warmup=_WARMUP.value, profile_dir=_PROFILE.value,
        config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
        command=shlex.join(["python", "-m", "arjax", *sys.argv[1:]]))
    print(bench.format_table(report))
    if path is None:
      print(json.dumps(report, indent=2))
    else:
      bench.write_report(report, path)
      print(f"report: {path}")


def parse_flags(argv):
  """absl's flag parsing, except that an override naming no config field (`--config.model.dept=3`)
  ends in one line naming it and the nearest field, not in ml_collections' traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if config_arg is None:
      raise
    from arjax.config import schema as configs
    config = configs.load(config_arg)
    for arg in argv[1:]:
      if arg.startswith("--config."):
        problem = configs.unknown_override(config, arg[len("--config."):].split("=", 1)[0])
        if problem:
          sys.exit(f"error: {problem}")
    raise e


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
