"""Every command the README shows is real: its subcommand, flags, config file and overrides exist,
and a test (or `make demo`) runs it. A README command missing from EXERCISED_BY fails the suite,
so an example nobody runs cannot be added."""
import re
import shlex

import pytest

from arjax import registry
from arjax.config import schema as configs
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"

# README command (whitespace-normalised, line continuations joined) -> what runs it for real:
# "tests/FILE.py::TEST" or "make demo" / "make test" (the Makefile target of that name).
EXERCISED_BY = {
    "python -m arjax bench --config=configs/mar_cpu_bench.py --mode=train --repeats=10":
        "tests/test_bench.py::test_mar_cpu_bench_preset_benches_at_smoke_size",
    "python -m arjax bench --config=configs/mar_cpu_bench.py --mode=sample --repeats=7":
        "tests/test_bench.py::test_mar_cpu_bench_preset_benches_at_smoke_size",
    "python -m arjax serve --workdir=workdirs/digits":
        "tests/test_serve.py::test_page_samples_a_grid_in_headless_chromium",
    "make demo": "make demo",
    "make test": "make test",
    "python -m arjax train --config=configs/digits.py --workdir=workdirs/digits": "make demo",
    "python -m arjax sample --config=configs/digits.py --workdir=workdirs/digits": "make demo",
    "python -m arjax eval --config=configs/digits.py --workdir=workdirs/digits": "make demo",
    "python -m arjax bench --config=configs/digits.py --mode=train --repeats=20":
        "tests/test_bench.py::test_cli_bench_writes_report",
    "python -m arjax bench --config=configs/imagenet256.py --mode=train --batch=128 --repeats=10":
        "tests/test_bench.py::test_run_reports_every_field_with_sane_values",
    "python -m arjax bench --config=configs/digits.py --mode=sample --batch=500 --repeats=5":
        "tests/test_bench.py::test_run_reports_every_field_with_sane_values",
    "python -m arjax describe --config=configs/imagenet256_mar_base.py:h100x8":
        "tests/test_describe.py::test_cli_describes_the_mar_base_preset_on_8_h100",
    "python -m arjax train --config=configs/digits.py:smoke --workdir=/tmp/smoke "
    "--config.train.num_steps=6": "tests/test_cli.py::test_train_sample_eval",
    "python -m arjax sample --config=configs/digits.py:smoke --workdir=/tmp/smoke "
    "--config.sample.cfg_scale=2.0 --config.sample.labels=3,5":
        "tests/test_cli.py::test_train_sample_eval",
    "python -m arjax train --config=configs/digits.py:smoke --workdir=/tmp/two_hosts "
    "--config.mesh.shape='(2,2,2)' --coordinator_address=127.0.0.1:12345 --num_processes=2 "
    "--process_id=$i": "tests/test_multihost.py::test_two_processes_train_like_one",
    "python -m arjax convert --source=kl16.ckpt --out=weights/kl16":
        "tests/test_convert_cli.py::test_vae_round_trip_through_orbax",
    "python -m arjax convert --source=mar_base/checkpoint-last.pth --out=weights/mar_base "
    "--config=configs/imagenet256_mar_base.py --config.tokenizer.checkpoint=weights/kl16":
        "tests/test_convert_cli.py::test_convert_writes_a_workdir_and_says_how_to_sample_from_it",
    "python -m arjax sample --config=weights/mar_base/config.py --workdir=weights/mar_base":
        "tests/test_convert_cli.py::test_sample_command_runs_unchanged_on_the_converted_dir",
    "python -m arjax convert --kind=inception --source=pt_inception-2015-12-05-6726825d.pth "
    "--out=weights/inception": "tests/test_inception_convert.py::test_the_cli_converts_with_kind_inception",
    "python -m arjax eval --config=configs/imagenet256_mar_base.py --workdir=... "
    "--config.eval.inception=weights/inception "
    "--config.eval.reference=VIRTUAL_imagenet256_labeled.npz":
        "tests/test_paper_metrics.py::test_eval_prints_the_papers_metrics_from_the_command_line",
    "python -m arjax fid_stats --config=configs/imagenet256_mar_base.py "
    "--inception=weights/inception --split=train":
        "tests/test_fid_stats.py::test_fid_stats_writes_loadable_statistics_and_reuses_them",
    "python -m arjax cache_latents --config=configs/imagenet256_mar_base.py "
    "--config.tokenizer.checkpoint=weights/kl16 --out=latents/imagenet256_kl16":
        "tests/test_latent_cache.py::test_command_line_caches_a_split_next_to_the_others",
    "python -m arjax train --config=configs/imagenet256_mar_base.py "
    "--config.tokenizer.checkpoint=weights/kl16 --config.data.latents=latents/imagenet256_kl16 "
    "--workdir=...": "tests/test_latent_cache.py::test_training_runs_from_the_cache_and_checkpoints_its_iterator",
}

_COMMAND = re.compile(r"(python -m arjax \S.*|^\s*make \S.*)")


def readme_commands(text: str) -> list:
  """The `python -m arjax ...` and `make ...` commands of the README's ``` blocks, each one
  line (backslash continuations joined, comments, `&` and `;`-tails dropped)."""
  commands = []
  for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      match = _COMMAND.search(line)
      if not match:
        continue
      words = shlex.split(match.group(1).split(" &")[0].split(";")[0], comments=True,
                          posix=False)
      commands.append(" ".join(words))
  return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_shows_the_commands_the_issue_asks_for():
  # The extraction itself: a README without these would mean the parser lost them.
  assert "make demo" in COMMANDS and "make test" in COMMANDS
  assert {c.split()[3] for c in COMMANDS if c.startswith("python -m arjax")} >= {
      "train", "sample", "eval", "bench", "describe", "convert", "cache_latents"}


def test_every_readme_command_names_what_runs_it():
  missing = [c for c in COMMANDS if c not in EXERCISED_BY]
  assert not missing, ("README commands that no test or `make demo` runs; add each to "
                       f"tests/test_readme.py's EXERCISED_BY with the test that runs it: {missing}")


@pytest.mark.parametrize("runner", sorted(set(EXERCISED_BY.values())))
def test_every_runner_named_exists(runner):
  if runner.startswith("make "):
    target = runner.split()[1]
    assert re.search(rf"^{target}:", (REPO_ROOT / "Makefile").read_text(), re.M), runner
    return
  path, name = runner.split("::")
  source = (REPO_ROOT / path).read_text()
  assert re.search(rf"^def {name}\(", source, re.M), f"{runner}: no such test"


def _flags():
  from absl import flags
  import arjax.__main__ as cli  # noqa: F401  (defines the flags)
  return cli, flags.FLAGS


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m arjax")])
def test_every_readme_command_uses_a_real_subcommand_flags_config_and_fields(command):
  cli, defined = _flags()
  words = shlex.split(command)
  assert words[3] in cli.COMMANDS, f"{command}: no subcommand {words[3]!r}"
  config_arg = None
  overrides = []
  for word in words[4:]:
    assert word.startswith("--"), f"{command}: {word!r} is not a flag"
    name, _, value = word[2:].partition("=")
    if name.startswith("config."):
      overrides.append(name[len("config."):])
      continue
    assert name in defined, f"{command}: --{name} is not a flag of python -m arjax"
    if name == "config":
      config_arg = value
  if config_arg is None or not config_arg.startswith("configs/"):
    # No config, or one that a command writes (convert's DIR/config.py): its runner checks it.
    return
  config = configs.load(str(REPO_ROOT / config_arg))
  registry.validate(config)
  for path in overrides:
    assert configs.unknown_override(config, path) == "", f"{command}: {path}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_every_make_command_is_a_makefile_target(command):
  target = command.split()[1]
  assert re.search(rf"^{target}:", (REPO_ROOT / "Makefile").read_text(), re.M), command


def test_a_command_the_table_does_not_know_is_caught():
  text = "```\npython -m arjax train --config=configs/digits.py --workdir=new \\\n  --seed=1\n```\n"
  assert readme_commands(text) == [
      "python -m arjax train --config=configs/digits.py --workdir=new --seed=1"]
  assert readme_commands(text)[0] not in EXERCISED_BY


def test_links_to_files_in_the_repository_resolve():
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text()):
    assert (REPO_ROOT / target).exists(), f"README links to missing {target}"


@pytest.mark.parametrize("command", [c for c, runner in EXERCISED_BY.items()
                                     if runner == "make demo" and c.startswith("python")])
def test_commands_said_to_run_in_make_demo_are_the_ones_it_runs(command):
  makefile = (REPO_ROOT / "Makefile").read_text()
  words = dict(w[2:].split("=", 1) for w in shlex.split(command)[4:])
  assert re.search(rf"^CONFIG \?= {re.escape(words['config'])}$", makefile, re.M)
  assert re.search(rf"^WORKDIR \?= {re.escape(words['workdir'])}$", makefile, re.M)
  subcommand = shlex.split(command)[3]
  assert f"-m arjax {subcommand} --config=$(CONFIG) --workdir=$(WORKDIR)" in makefile
