"""Writes notebooks/pretrained_mar.ipynb (nbformat 4, no outputs): `python notebooks/build_pretrained_mar.py`.

The notebook is generated so that its code lives in one reviewable place; edit the cells here.
"""
import notebook_builder as nb

NAME = "pretrained_mar"

MARKDOWN_INTRO = """\
# Official MAR weights in arjax

Converts the official MAR release (Li et al. 2024, github.com/LTH14/mar) into arjax checkpoints
with `arjax.convert.official` (what `python -m arjax convert` runs), then samples one image for
each of ten ImageNet classes with arjax's MAR sampler and shows the grid.

You need two files from MAR's README ("Installation" / pre-trained models):
`pretrained_models/vae/kl16.ckpt` (the KL-16 tokenizer) and
`pretrained_models/mar/mar_base/checkpoint-last.pth` (or mar_large / mar_huge; set `CONFIG` to
match). `.pth`/`.ckpt` files are read by arjax's own restricted unpickler: torch is not
needed, and a pickle that would run code is refused (see `arjax/weights/torch_zip.py`).

Sampling MAR-B takes seconds on a GPU and many minutes on a CPU; lower `NUM_ITER` to go faster.
Without checkpoint paths the notebook prints how to get them and does nothing else."""

SETTINGS = """\
# Paths to the official files; default from the environment, None when unset.
MAR_CHECKPOINT = os.environ.get("MAR_CHECKPOINT") or None  # .../mar_base/checkpoint-last.pth
VAE_CHECKPOINT = os.environ.get("VAE_CHECKPOINT") or None  # .../vae/kl16.ckpt

CONFIG = "configs/imagenet256_mar_base.py"  # _large / _huge to match; relative to the repository
OUT = "workdirs/pretrained_mar"  # converted checkpoints go here; relative to the repository

# Ten ImageNet classes, one image each: MAR's demo classes.
CLASSES = [207, 360, 387, 974, 88, 979, 417, 279, 22, 980]
NUM_ITER = 64   # MAR's generation steps (the paper's FID uses 256)
CFG_SCALE = 4.0
SEED = 0"""

CHECK = """\
CONFIG, OUT = os.path.join(REPO, CONFIG), os.path.join(REPO, OUT)
READY = MAR_CHECKPOINT is not None and VAE_CHECKPOINT is not None
if not READY:
  missing = "MAR" if MAR_CHECKPOINT is None else "VAE"
  print(f"Skipping: no {missing} checkpoint given. Download kl16.ckpt and "
        "mar_base/checkpoint-last.pth as MAR's README describes (github.com/LTH14/mar), then "
        "set MAR_CHECKPOINT and VAE_CHECKPOINT (environment variables, or the parameters cell) "
        "and run the notebook again.")"""

CONVERT = """\
if READY:
  from arjax.config import schema as configs
  from arjax.convert import official

  vae_dir, mar_dir = os.path.join(OUT, "kl16"), os.path.join(OUT, "mar")
  config = configs.load(CONFIG)
  # Each conversion runs once; a second run of the notebook reuses what it wrote.
  if not os.path.isdir(vae_dir):
    result = official.convert(VAE_CHECKPOINT, vae_dir, config=config, kind="vae")
    print(official.summary(result))
  config.tokenizer.checkpoint = vae_dir
  if not os.path.isfile(os.path.join(mar_dir, "config.py")):
    result = official.convert(MAR_CHECKPOINT, mar_dir, config=config, kind="mar")
    print(official.summary(result))
  config = configs.load(os.path.join(mar_dir, "config.py"))"""

SAMPLE = """\
if READY:
  import jax
  import numpy as np

  from arjax.commands import sample as generate
  from arjax.data import pipeline
  from arjax.training.experiment import Experiment

  config.sample.num_iter = NUM_ITER
  exp = Experiment(config)
  params, step = generate.restore_params(exp, mar_dir, use_ema=True)
  sampler = exp.sampler()
  images = sampler(params, np.asarray(CLASSES, np.int32), jax.random.PRNGKey(SEED),
                   cfg_scale=CFG_SCALE, cfg_schedule_name=config.sample.cfg_schedule,
                   temperature=config.sample.temperature)
  images = pipeline.denormalize(np.asarray(jax.device_get(images)))
  print(f"{len(images)} images of {images.shape[1:]} from the EMA weights (epoch {step})")"""

SHOW = """\
if READY:
  from IPython.display import display
  from PIL import Image

  from arjax.util.image_grid import make_grid

  grid = Image.fromarray(make_grid(images, num_rows=2, upscale=1))
  grid.save(os.path.join(OUT, "classes.png"))
  display(grid)"""


CELLS = [nb.markdown(MARKDOWN_INTRO), nb.code(nb.SETUP), nb.parameters(SETTINGS), nb.code(CHECK),
         nb.code(CONVERT), nb.code(SAMPLE), nb.code(SHOW)]

if __name__ == "__main__":
  print(f"wrote {nb.write(NAME, CELLS)}")
