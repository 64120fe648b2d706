"""`eval`: score `workdir/samples.npz` against the held-out split; write eval.json and print a table."""
import json
import os

import numpy as np

from arjax.evaluation import metrics as evaluate
from arjax.evaluation import plots
from arjax.training import summary
from arjax.data import pipeline


def load_samples(workdir: str):
  path = os.path.join(workdir, "samples.npz")
  if not os.path.exists(path):
    from arjax.training import checkpoint
    first = ("" if checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir)) else
             f"it holds no checkpoint either, so train first (python -m arjax train "
             f"--config=CONFIG --workdir={workdir}), then ")
    raise FileNotFoundError(
        f"{path} does not exist: eval scores the samples of a workdir; {first}draw them with "
        f"`python -m arjax sample --config=CONFIG --workdir={workdir}` (CONFIG: the same "
        "--config as for eval)")
  with np.load(path, allow_pickle=False) as f:
    return f["images"], f["labels"]


def run(config, workdir: str) -> str:
  d = config.data
  images, labels = load_samples(workdir)
  pipeline.prepare(d.name, d.data_dir)
  train_images, train_labels = pipeline.load_split(d, d.train_split)
  eval_images, eval_labels = pipeline.load_split(d, d.eval_split)
  print(summary.evaluation(config, os.path.join(workdir, "samples.npz"), num_samples=len(images),
                           num_train=len(train_images), num_eval=len(eval_images)), flush=True)
  metrics = evaluate.evaluate(
      images, labels, train_images=train_images, train_labels=train_labels,
      eval_images=eval_images, eval_labels=eval_labels,
      cache_dir=pipeline.default_data_dir(d.data_dir), name=d.name, seed=config.sample.seed,
      progress=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=2, default=float)
  report = plots.write_eval_report(workdir, metrics, images, labels, train_images)
  return (evaluate.format_report(metrics)
          + f"\nmetrics: {os.path.join(workdir, 'eval.json')}"
          + f"\nsample grid: {os.path.join(workdir, 'samples.png')}"
          + f"\nreport: {report['html']} (panels {report['grid']}, {report['neighbours']})")
