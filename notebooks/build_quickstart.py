"""Writes notebooks/quickstart.ipynb (nbformat 4, no outputs): `python notebooks/build_quickstart.py`.

The notebook is generated so that its code lives in one reviewable place; edit the cells here.
"""
import notebook_builder as nb

NAME = "quickstart"

INTRO = """\
# arjax quickstart: train the digits model, look at its samples

arjax models a sequence of continuous tokens (here: 2x2 pixel patches of 8x8 digits) with a
causal Transformer, and each token given the ones before it with a small flow-matching head
that samples by integrating an ODE. This notebook runs the library's own training loop on the
bundled digits (scikit-learn's 1797 images, no download) at the full size of the recipe
`configs/digits.py`, for a few minutes, then

1. plots the loss curve from the TensorBoard scalars training wrote,
2. samples a grid of every class from the EMA weights,
3. changes the classifier-free guidance (CFG) scale and the temperature and shows what they do.

Time: `TRAIN_STEPS = 400` is a quarter of the recipe's 1600 steps (the README's results); on two
otherwise idle CPU cores (a Colab CPU runtime has two) that is about 2 minutes, and it took 15
minutes on this project's 2-core machine while four other jobs shared it. The digits are
recognisable at 400 steps, cleaner at 1600. Running the notebook again resumes from the
workdir's checkpoint: a workdir that reached `TRAIN_STEPS` only samples."""

PARAMETERS = """\
CONFIG = "configs/digits.py"    # the recipe; relative to the repository
TRAIN_STEPS = 400               # the recipe trains 1600 (the README's results table)
WORKDIR = "workdirs/quickstart" # checkpoints, TensorBoard scalars, sample grids; relative to the repository
DATA_DIR = None                 # TFDS data dir; None: $ARJAX_DATA_DIR or ~/.cache/arjax/tensorflow_datasets
IMAGES_PER_CLASS = 10           # columns of the sample grids
CFG_SCALES = [1.0, 3.0, 6.0]    # 1.0 = no guidance
TEMPERATURES = [0.6, 1.0, 1.4]  # scale of each token's starting noise
SEED = 0"""

SETUP_RUN = """\
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

from arjax.config import schema as configs
from arjax.commands import sample as generate
from arjax.training import loop as train
from arjax.data import pipeline
from arjax.training.experiment import Experiment
from arjax.util.image_grid import make_grid
from arjax.training.tensorboard_scalars import read_scalars

WORKDIR = os.path.join(REPO, WORKDIR)
config = configs.load(os.path.join(REPO, CONFIG))
config.train.num_steps = TRAIN_STEPS  # the learning-rate schedule ends where training does
config.data.data_dir = DATA_DIR
print(f"devices: {jax.devices()}")
print(f"backbone: causal Transformer, width {config.model.width}, depth {config.model.depth}; "
      f"flow head: width {config.head.width}, depth {config.head.depth}; "
      f"batch {config.train.global_batch_size}, {config.train.num_steps} steps; workdir {WORKDIR}")


def show(ax, images, title, rows=config.data.num_classes):
  \"\"\"uint8 images [N, H, W, C] as a grid with `rows` rows (one class per row).\"\"\"
  grid = make_grid(images, num_rows=rows, upscale=1)
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
  ax.set_title(title, fontsize=9)
  ax.axis("off")"""

DATA_MD = """\
## The data

`pipeline.prepare` builds the digits once as TFDS ArrayRecord files (a few seconds) with arjax's
own TFDS builder; training reads them through a seeded grain pipeline. The fixed split keeps a
quarter of the images out of training, for evaluation."""

DATA = """\
pipeline.prepare(config.data.name, config.data.data_dir)
real, real_labels = pipeline.load_split(config.data, config.data.train_split)
print(f"{len(real)} training images of shape {real.shape[1:]} "
      f"in {pipeline.default_data_dir(config.data.data_dir)}")
# A few real digits of each class, in the layout of the sample grids below.
picked = np.concatenate([real[real_labels == k][:IMAGES_PER_CLASS]
                         for k in range(config.data.num_classes)])
fig, ax = plt.subplots(figsize=(4, 4))
show(ax, picked, "real training digits, one class per row")
plt.show()"""

TRAIN_MD = """\
## Train

`train.train_and_evaluate` is the loop `python -m arjax train` runs: a jitted, sharded step on
every device JAX sees, a progress bar, TensorBoard scalars, sample grids and Orbax checkpoints
in `WORKDIR`. The same thing from a terminal:

    python -m arjax train --config=configs/digits.py --workdir=workdirs/quickstart --config.train.num_steps=400"""

TRAIN = """\
start = time.perf_counter()
state = train.train_and_evaluate(config, WORKDIR)
print(f"at step {int(state.step)} after {time.perf_counter() - start:.0f} s")"""

CURVE_MD = """\
## Loss curve

Training logs its metrics every `config.train.log_every` steps to `WORKDIR/tensorboard`
(`tensorboard --logdir workdirs` shows them too); `read_scalars` reads them back without
TensorFlow. The loss is the flow-matching loss: the mean squared error of the predicted velocity
over random noise levels, so it flattens well above zero."""

CURVE = """\
scalars = read_scalars(WORKDIR)
print("logged:", ", ".join(sorted(scalars)))
fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(10, 3.2))
ax_loss.plot(*scalars["train/loss"], marker=".")
ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
ax_speed.plot(*scalars["train/images_per_second"], marker=".")
ax_speed.set(xlabel="step", ylabel="images / s", title="throughput")
plt.tight_layout()
plt.show()"""

SAMPLES_MD = """\
## Samples

The sampler fills a KV cache with the class prefix, then generates the 16 tokens in raster order
in one compiled `lax.scan`; each token is drawn by integrating the head's ODE from noise. The
defaults come from `config.sample`: CFG on a linear ramp to 3.0, Heun with 16 steps."""

SAMPLES = """\
exp = Experiment(config)
params, step = generate.restore_params(exp, WORKDIR, use_ema=True)
sampler = exp.sampler()
labels = np.repeat(np.arange(config.data.num_classes), IMAGES_PER_CLASS)
s = config.sample


def draw(cfg_scale=s.cfg_scale, temperature=s.temperature, cfg_schedule=s.cfg_schedule):
  \"\"\"uint8 samples for `labels`, always from the noise of SEED.\"\"\"
  images = sampler(params, labels, jax.random.PRNGKey(SEED), cfg_scale=cfg_scale,
                   cfg_schedule_name=cfg_schedule, temperature=temperature)
  return pipeline.denormalize(np.asarray(jax.device_get(images)))


fig, ax = plt.subplots(figsize=(4, 4))
show(ax, draw(), f"samples at step {step} (EMA weights), one class per row")
plt.show()"""

KNOBS_MD = """\
## CFG and temperature

Every panel starts from the same noise (the same seed), so only the setting differs.
**CFG** mixes the class-conditional and unconditional velocities, `v_u + s (v_c - v_u)`:
at 1.0 there is no guidance and some digits drift from their class; a moderate scale (the
recipe's 3.0, ramped) keeps them in their class; too large a scale overshoots into speckled,
broken strokes. **Temperature** scales the noise each token's ODE starts from: below 1 strokes
get cleaner and more alike, above 1 noisier and more varied."""

KNOBS = """\
columns = max(len(CFG_SCALES), len(TEMPERATURES))
fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.6), squeeze=False)
for ax in axes.flat:
  ax.axis("off")
for ax, scale in zip(axes[0], CFG_SCALES):
  show(ax, draw(cfg_scale=scale), f"CFG {scale} ({s.cfg_schedule}), temperature {s.temperature}")
for ax, temperature in zip(axes[1], TEMPERATURES):
  show(ax, draw(temperature=temperature), f"CFG {s.cfg_scale}, temperature {temperature}")
plt.tight_layout()
plt.show()"""

NEXT_MD = """\
## Next

* `sampling_and_guidance.ipynb` samples this workdir's model with other ODE solvers and step
  counts, CFG ramps and intervals, temperatures and seeds.
* From a terminal, `python -m arjax sample --config=configs/digits.py --workdir=workdirs/quickstart`
  writes 1000 samples (`samples.npz`, `samples.png`) and `python -m arjax eval` with the same
  flags scores them (Fréchet distance, precision/recall, class consistency, memorisation)."""

CELLS = [
    nb.markdown(INTRO), nb.code(nb.SETUP), nb.parameters(PARAMETERS), nb.code(SETUP_RUN),
    nb.markdown(DATA_MD), nb.code(DATA), nb.markdown(TRAIN_MD), nb.code(TRAIN),
    nb.markdown(CURVE_MD), nb.code(CURVE), nb.markdown(SAMPLES_MD), nb.code(SAMPLES),
    nb.markdown(KNOBS_MD), nb.code(KNOBS), nb.markdown(NEXT_MD),
]

if __name__ == "__main__":
  print(f"wrote {nb.write(NAME, CELLS)}")
