"""The embedded default: class-conditional 8x8 digits (scikit-learn's bundled set).

  python -m arjax train --config=configs/digits.py --workdir=workdirs/digits
  python -m arjax train --config=configs/digits.py:smoke --workdir=/tmp/smoke   # seconds, for tests
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seed of parameter init, label dropout, flow noise; the data order has its own seed below.
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # TFDS dataset name; 'digits' is prepared on the fly by arjax's own builder.
  config.data.name = "digits"
  # Where TFDS datasets live; None = $ARJAX_DATA_DIR or ~/.cache/arjax/tensorflow_datasets.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.train_split = "train"
  config.data.eval_split = "test"
  # Images are resized (if needed) to image_size x image_size with this many channels.
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  # Seed of the shuffle; the pipeline is a pure function of (seed, step) so resume is exact.
  config.data.shuffle_seed = 0
  # Augmentations: horizontal flips make no sense for digits (they change the class).
  config.data.random_flip = False
  # Random translation by up to this many pixels per axis (0 = off).
  config.data.random_translate = 0
  # Host-side worker threads/processes for decoding; 0 = in the main thread.
  config.data.worker_count = 0
  # Consecutive training images of one class (a training sequence of ARFlow, configs/
  # digits_arflow.py); 1 = every image drawn independently.
  config.data.group_size = 1
  # A latent cache (`python -m arjax cache_latents`) to train from instead of images, for VAE
  # tokenizers; None = encode images on the fly. A typed placeholder so the command line can set it.
  config.data.latents = ml_collections.config_dict.placeholder(str)

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.name = "patchify"
  # 2x2 pixel patches: 16 tokens of dim 4 on 8x8 digits.
  config.tokenizer.patch_size = 2
  # Tokens = normalised pixels in [-1, 1] times this.
  config.tokenizer.scale = 1.0

  config.model = ml_collections.ConfigDict()
  # 'causal': raster-order decoder with a KV cache.
  config.model.family = "causal"
  config.model.width = 128
  config.model.depth = 6
  config.model.num_heads = 4
  config.model.mlp_ratio = 4.0
  # Learned prefix vectors per class (the null class has its own).
  config.model.num_class_tokens = 4
  # Share of labels replaced by the null class in training (enables CFG).
  config.model.label_drop = 0.1
  # Blocks stacked by nn.scan (compile time flat in depth; parameters gain a 'layers' axis)
  # and what the backward pass recomputes: 'none', 'full', 'dots', 'dots_no_batch'. Six blocks
  # compile quickly unrolled, and the activations are small.
  config.model.scan_layers = False
  config.model.remat = "none"
  # Compute dtype; parameters and optimizer state stay float32.
  config.model.dtype = "float32"
  # Dropout (training only) of attention probabilities and of the blocks' residual branches:
  # it slows memorisation (docs/model.md, "The digits recipe").
  config.model.attention_dropout = 0.1
  config.model.dropout = 0.1

  config.head = ml_collections.ConfigDict()
  config.head.name = "flow"
  config.head.width = 128
  config.head.depth = 3
  # Noise/time draws per backbone output z (MAR's diffusion_batch_mul). 2, not MAR's 4: the
  # head is half the step's FLOPs at 4, and with 2 draws the recipe meets the bar inside
  # `make demo`'s 10 minutes (docs/model.md, "The digits recipe").
  config.head.batch_mul = 2
  # Dropout (training only) in the head's residual blocks.
  config.head.dropout = 0.1
  # Logit-normal training time distribution.
  config.head.t_mean = 0.0
  config.head.t_std = 1.0

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 128
  # 1000 steps (95 epochs): past ~1000 the samples copy training digits more than held-out
  # digits resemble them (memorisation, train_curves.png), for little FD.
  config.train.num_steps = 1000
  config.train.learning_rate = 1e-3
  # 'cosine' (warmup then cosine to 0) or 'constant' (warmup then flat).
  config.train.schedule = "cosine"
  config.train.warmup_steps = 100
  config.train.weight_decay = 0.02
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.95
  config.train.grad_clip_norm = 1.0
  config.train.ema_decay = 0.999
  config.train.log_every = 50
  # A PNG grid of samples (one row per class) every this many steps; 0 = never.
  config.train.sample_every = 1000
  # Fréchet distance and memorisation of eval_num_samples EMA samples every this many steps
  # (train_curves.png): where a run starts to memorise. 0 = never.
  config.train.eval_every = 250
  config.train.eval_num_samples = 200
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 2
  # Steps with a NaN/Inf loss or gradient are skipped (no update); this many in a row stop
  # training with a message (a diverged run, not a bad batch).
  config.train.max_nonfinite_steps = 20

  config.mesh = ml_collections.ConfigDict()
  # (data, fsdp, tensor); -1 takes the devices left over.
  config.mesh.shape = (-1, 1, 1)

  config.sharding = ml_collections.ConfigDict()
  # Logical axis -> mesh axes. The only place parallelism is decided.
  config.sharding.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),  # the stacked axis of scanned blocks: each device holds every layer
      ("classes", None),
      ("token", None),
      ("norm", None),
      ("time", None),
      ("mlp_out", None),
  )

  config.sample = ml_collections.ConfigDict()
  config.sample.num_images = 1000
  # Comma-separated class ids cycled over the images; '' = equal share of every class.
  config.sample.labels = ""
  # Classifier-free guidance on the velocity; 1 = none.
  config.sample.cfg_scale = 2.0
  # 'constant', or 'linear': ramps 1 -> cfg_scale over token positions (early tokens
  # unguided keep the variety of strokes, late ones guided keep the class).
  config.sample.cfg_schedule = "linear"
  # Guidance acts only while the ODE time t (1 = noise, 0 = data) lies in this interval.
  config.sample.cfg_interval = (0.0, 1.0)
  # Scale of the initial noise of each token's ODE (> 1 widens the draws: recall; dropout-trained
  # models sample narrower than the data at 1).
  config.sample.temperature = 1.15
  config.sample.num_steps = 16
  # 'euler', 'heun' (ODE) or 'euler_maruyama' (the flow head's reverse SDE).
  config.sample.solver = "heun"
  # The SDE's noise: c in g(t)^2 = 2 c t (arjax/heads/flow.py); 'euler_maruyama' only.
  config.sample.diffusion_scale = 1.0
  # DiSA: the head's steps along the generation order, 'constant' (num_steps everywhere),
  # 'linear' or 'cosine' (num_steps at the first position / iteration -> head_steps_end at the
  # last), or a tuple with one count per position / iteration (arjax/sampling/step_schedule.py).
  config.sample.head_step_schedule = "constant"
  config.sample.head_steps_end = 4
  config.sample.seed = 0
  config.sample.batch_size = 500
  # Sample with the EMA parameters (True) or the raw ones.
  config.sample.use_ema = True

  config.eval = ml_collections.ConfigDict()
  # 'classifier': FD, precision/recall, class consistency and memorisation on a small CNN fitted
  # to the train split, beside held-out images and per-class Gaussian / GMM baselines.
  # 'inception': the papers' FID / IS / precision / recall on the FID Inception-v3.
  config.eval.metrics = "classifier"
  # 'inception' only: the weights (`python -m arjax convert --kind=inception --out=DIR`) and
  # the reference statistics (.npz; None: `python -m arjax fid_stats`'s default file).
  config.eval.inception = ml_collections.config_dict.placeholder(str)
  config.eval.reference = ml_collections.config_dict.placeholder(str)
  config.eval.batch_size = 64
  # The published row to print beside the numbers ('MAR-B', ...); '' = none.
  config.eval.paper_row = ""

  if variant == "smoke":
    config.model.width = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.num_class_tokens = 1
    config.head.width = 32
    config.head.depth = 1
    # 4 as when tests/data/smoke_samples_*.npz were recorded (tests/test_same_samples.py).
    config.head.batch_mul = 4
    config.train.global_batch_size = 16
    config.train.num_steps = 4
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.sample_every = 0
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    # The smoke runs keep the settings tests/data/smoke_samples_*_42a5198.npz were drawn with.
    config.model.attention_dropout = config.model.dropout = config.head.dropout = 0.0
    config.sample.cfg_scale = 3.0
    config.sample.temperature = 1.0
    config.sample.num_images = 20
    config.sample.batch_size = 20
    config.sample.num_steps = 2
  elif variant:
    raise ValueError(f"configs/digits.py has no variant {variant!r}; known: 'smoke'")
  return config
