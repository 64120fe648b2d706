"""Writes notebooks/sampling_and_guidance.ipynb (nbformat 4, no outputs):
`python notebooks/build_sampling_and_guidance.py`.

The notebook is generated so that its code lives in one reviewable place; edit the cells here.
"""
import notebook_builder as nb

NAME = "sampling_and_guidance"

INTRO = """\
# Sampling and guidance

What each knob of arjax's sampler does, on the digits model: the head's ODE (solver and number
of steps), classifier-free guidance (scale, constant or ramped over token positions, the noise
interval it acts on), temperature, seeds, and per-class grids. Every knob is a field of
`config.sample` (so `python -m arjax sample --config.sample.<field>=...` takes it too) or an
argument of the sampler.

It samples the model in `WORKDIR` as it is; by default that is the quickstart's workdir, so run
`quickstart.ipynb` first, or leave `WORKDIR` without a checkpoint and this notebook trains
`TRAIN_STEPS` steps there first (see the quickstart for the time it takes)."""

PARAMETERS = """\
CONFIG = "configs/digits.py"      # the config WORKDIR was trained with; relative to the repository
WORKDIR = "workdirs/quickstart"   # with a checkpoint: sampled as it is; without: trained here first
TRAIN_STEPS = 400                 # only used when WORKDIR holds no checkpoint
DATA_DIR = None                   # TFDS data dir; None: $ARJAX_DATA_DIR or ~/.cache/arjax/tensorflow_datasets
IMAGES_PER_CLASS = 6              # columns of the comparison grids
ODE_STEPS = [1, 2, 4, 8, 16]      # integration steps of each token's ODE
SOLVERS = ["euler", "heun"]
CFG_SCALES = [1.0, 2.0, 3.0, 5.0]
CFG_INTERVALS = [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)]  # ODE times t (1 = noise, 0 = data) guided
TEMPERATURES = [0.5, 0.8, 1.0, 1.3]
PER_CLASS = 16                    # images in each per-class grid (a square number fills it)
SEED = 0"""

SETUP_RUN = """\
import math
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

from arjax.training import checkpoint
from arjax.config import schema as configs
from arjax.commands import sample as generate
from arjax.training import loop as train
from arjax.data import pipeline
from arjax.training.experiment import Experiment
from arjax.util.image_grid import make_grid
from arjax.families.causal.sampler import Sampler, cfg_schedule

WORKDIR = os.path.join(REPO, WORKDIR)
config = configs.load(os.path.join(REPO, CONFIG))
config.data.data_dir = DATA_DIR
if checkpoint.committed_steps(checkpoint.checkpoint_dir(WORKDIR)):
  print(f"sampling the model in {WORKDIR} as it is")
else:
  print(f"{WORKDIR} holds no checkpoint: training {TRAIN_STEPS} steps there first")
  config.train.num_steps = TRAIN_STEPS
  train.train_and_evaluate(config, WORKDIR)

exp = Experiment(config)
params, step = generate.restore_params(exp, WORKDIR, use_ema=True)
s = config.sample
num_classes = config.data.num_classes
labels = np.repeat(np.arange(num_classes), IMAGES_PER_CLASS)
print(f"EMA weights of step {step}; defaults: {s.solver} with {s.num_steps} steps, CFG {s.cfg_scale} "
      f"({s.cfg_schedule}, interval {tuple(s.cfg_interval)}), temperature {s.temperature}")


def sampler_with(**fields):
  \"\"\"A sampler with some of config.sample's compiled-in fields changed (num_steps, solver,
  cfg_interval): each is another program, compiled on its first call.\"\"\"
  kwargs = dict(num_steps=s.num_steps, solver=s.solver, cfg_interval=tuple(s.cfg_interval))
  return Sampler(exp.model, exp.head, exp.tokenizer, **dict(kwargs, **fields))


default_sampler = sampler_with()


def draw(sampler=default_sampler, labels=labels, seed=SEED, first_index=0,
         cfg_scale=s.cfg_scale, cfg_schedule_name=s.cfg_schedule, temperature=s.temperature):
  \"\"\"uint8 images [N, H, W, C]. Scale, ramp and temperature are arguments: no recompiling.\"\"\"
  images = sampler(params, labels, jax.random.PRNGKey(seed), first_index=first_index,
                   cfg_scale=cfg_scale, cfg_schedule_name=cfg_schedule_name, temperature=temperature)
  return pipeline.denormalize(np.asarray(jax.device_get(images)))


def show(ax, images, title, rows=num_classes):
  grid = make_grid(images, num_rows=rows, upscale=1)
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
  ax.set_title(title, fontsize=9)
  ax.axis("off")


def panels(rows, columns, size=2.6):
  fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows * 1.05),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  return axes"""

ODE_MD = """\
## The head's ODE: solver and steps

Each token is drawn by integrating the head's velocity from noise (`t = 1`) to data (`t = 0`).
One step jumps from the noise to the head's one-shot estimate, made at the noise level where
training (logit-normal times) rarely looked: speckled digits. A few steps follow the flow and
recover the strokes. Heun corrects each Euler step with a second evaluation (twice the head's
work per step); its last step is a plain Euler step, so with 1 step the two solvers agree. The
backbone runs once per token whatever the solver. Times are of a second call (the first one
compiles), and on a machine shared with other jobs they are only rough."""

ODE = """\
axes = panels(len(SOLVERS), len(ODE_STEPS))
for row, solver in zip(axes, SOLVERS):
  for ax, num_steps in zip(row, ODE_STEPS):
    sampler = sampler_with(solver=solver, num_steps=num_steps)
    draw(sampler)  # compiles
    start = time.perf_counter()
    images = draw(sampler)
    seconds = time.perf_counter() - start
    show(ax, images, f"{solver}, {num_steps} steps: {1e3 * seconds / len(labels):.1f} ms/image")
plt.tight_layout()
plt.show()"""

CFG_MD = """\
## Classifier-free guidance: scale and ramp

The guided velocity is `v_u + s (v_c - v_u)`, from the class and the null class (learned by
dropping 10% of the labels in training). `constant` guides every token with `s`; `linear` ramps
`1 -> s` over the token positions: the first tokens, which set the digit's placement and
thickness, stay unguided and varied, the last ones are guided toward the class. So at equal `s`
the ramp keeps more variety (the README measured recall 0.812 with a ramp to 3.0 against
0.790 for a constant 1.5 at the same class consistency)."""

CFG = """\
num_tokens = exp.tokenizer.num_tokens
fig, ax = plt.subplots(figsize=(5, 2.5))
for name in ("constant", "linear"):
  ax.plot(np.arange(num_tokens), cfg_schedule(max(CFG_SCALES), name, num_tokens), marker=".",
          label=name)
ax.set(xlabel="token position", ylabel="CFG scale", title=f"schedules for scale {max(CFG_SCALES)}")
ax.legend()
plt.show()

axes = panels(2, len(CFG_SCALES))
for row, name in zip(axes, ("constant", "linear")):
  for ax, scale in zip(row, CFG_SCALES):
    show(ax, draw(cfg_scale=scale, cfg_schedule_name=name), f"CFG {scale}, {name}")
plt.tight_layout()
plt.show()"""

INTERVAL_MD = """\
## Guidance interval

`config.sample.cfg_interval = (lo, hi)` applies guidance only while the ODE time `t` lies in
`[lo, hi]` (1 = noise, 0 = data) and uses the class velocity alone elsewhere. Kynkäänniemi et
al. (2024) found that guidance at the noisiest times mostly costs variety, and at the least
noisy ones does little; compare the panels. The interval is compiled in (a sampler per
interval)."""

INTERVAL = """\
axes = panels(1, len(CFG_INTERVALS))
for ax, interval in zip(axes[0], CFG_INTERVALS):
  images = draw(sampler_with(cfg_interval=tuple(interval)), cfg_scale=max(CFG_SCALES))
  show(ax, images, f"CFG {max(CFG_SCALES)} ({s.cfg_schedule}) on t in {tuple(interval)}")
plt.tight_layout()
plt.show()"""

TEMPERATURE_MD = """\
## Temperature

Each token's ODE starts from `temperature x N(0, 1)`. Below 1 the start lies nearer the
middle of the noise, and the flow maps it to more typical tokens: typically cleaner, more alike
digits. Above 1 it lands on rarer tokens: more varied, noisier strokes."""

TEMPERATURE = """\
axes = panels(1, len(TEMPERATURES))
for ax, temperature in zip(axes[0], TEMPERATURES):
  show(ax, draw(temperature=temperature), f"temperature {temperature}")
plt.tight_layout()
plt.show()"""

SEEDS_MD = """\
## Seeds

All the randomness of image `i` of a request comes from `(seed, i)`: the same seed gives the
same images, another seed other ones, and an image does not depend on the batch it is sampled
in. Sampling a request in two halves, each told the index of its first image (`first_index`,
what `python -m arjax sample` does batch by batch), gives the images of one call (up to the
float rounding of another batch size)."""

SEEDS = """\
first = draw(seed=SEED)
again = draw(seed=SEED)
other = draw(seed=SEED + 1)
half = len(labels) // 2
halves = np.concatenate([draw(default_sampler, labels[:half], first_index=0),
                         draw(default_sampler, labels[half:], first_index=half)])
print(f"same seed, same images: {np.array_equal(first, again)}")
print(f"seed {SEED + 1}: {np.mean(np.any(other != first, axis=(1, 2, 3))):.0%} of the images differ")
print(f"in two halves: largest pixel difference {np.abs(halves.astype(int) - first).max()} (of 255)")
axes = panels(1, 3)
show(axes[0, 0], first, f"seed {SEED}")
show(axes[0, 1], other, f"seed {SEED + 1}")
show(axes[0, 2], halves, f"seed {SEED}, two halves")
plt.tight_layout()
plt.show()"""

PER_CLASS_MD = """\
## Per-class grids

`PER_CLASS` images of each class with the default settings, drawn in one call: the variety the
model gives within a class."""

PER_CLASS_CELL = """\
per_class = draw(labels=np.repeat(np.arange(num_classes), PER_CLASS))
side = math.isqrt(PER_CLASS - 1) + 1  # the smallest square grid that holds PER_CLASS images
columns = min(num_classes, 5)
axes = panels(-(-num_classes // columns), columns)
for k, ax in zip(range(num_classes), axes.flat):
  show(ax, per_class[k * PER_CLASS:(k + 1) * PER_CLASS], f"class {k}", rows=side)
plt.tight_layout()
plt.show()"""

CELLS = [
    nb.markdown(INTRO), nb.code(nb.SETUP), nb.parameters(PARAMETERS), nb.code(SETUP_RUN),
    nb.markdown(ODE_MD), nb.code(ODE), nb.markdown(CFG_MD), nb.code(CFG),
    nb.markdown(INTERVAL_MD), nb.code(INTERVAL), nb.markdown(TEMPERATURE_MD), nb.code(TEMPERATURE),
    nb.markdown(SEEDS_MD), nb.code(SEEDS), nb.markdown(PER_CLASS_MD), nb.code(PER_CLASS_CELL),
]

if __name__ == "__main__":
  print(f"wrote {nb.write(NAME, CELLS)}")
