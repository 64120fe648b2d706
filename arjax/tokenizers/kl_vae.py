"""MAR's KL VAE (LDM `AutoencoderKL`) as a Flax module, and a frozen tokenizer around it.

An exact port of `models/vae.py` in github.com/LTH14/mar (itself adapted from LDM's
`ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`): Encoder, Decoder,
ResnetBlock (no timestep embedding), single-head AttnBlock, Downsample/Upsample, quant_conv /
post_quant_conv and the DiagonalGaussian posterior.

Layout: PyTorch runs NCHW; this port runs NHWC throughout (images `[B, H, W, C]`, latents
`[B, h, w, embed_dim]`), which is the natural Flax/XLA layout. Nothing inside the network depends
on the layout except (a) conv kernels, which `arjax.tokenizers.kl_vae_weights` transposes OIHW -> HWIO,
(b) the channel split of the posterior moments, which is on the last axis here instead of axis 1,
and (c) the token order of `patchify`, which reproduces MAR's NCHW feature order
(`c*p*p + pi*p + qi`, channel slowest) from the NHWC latent. Golden NCHW arrays therefore compare
after a `transpose(0, 2, 3, 1)`.

The Flax parameter tree mirrors the PyTorch state_dict names with every `name.<int>` merged into
`name_<int>` (`encoder.down.4.attn.0.q.weight` -> `encoder/down_4/attn_0/q/kernel`), so the
converter is a mechanical rename plus the kernel transpose.
"""
import dataclasses
import hashlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.errors import ConfigError
from arjax.layers import patches
from arjax.tokenizers import base

# MAR's latent scale: main_mar.py / engine_mar.py use `posterior.sample().mul_(0.2325)` and
# `vae.decode(tokens / 0.2325)`, chosen so KL-16 latents have roughly unit variance.
MAR_LATENT_SCALE = 0.2325

# DiagonalGaussianDistribution clamps logvar to this range (ldm/modules/distributions).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class KLVAEConfig:
  """The ddconfig plus AutoencoderKL's own arguments.

  Defaults are MAR's production KL-16 (`AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`,
  which keeps the Encoder/Decoder defaults ch=128, num_res_blocks=2, resolution=256 and encoder
  attn_resolutions=(16,); MAR's Decoder default is attn_resolutions=()).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  encoder_attn_resolutions: Sequence[int] = (16,)
  decoder_attn_resolutions: Sequence[int] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  # MAR passes z_channels=embed_dim; LDM configs may differ (quant convs then change width).
  z_channels: int = 16
  embed_dim: int = 16
  double_z: bool = True
  # MAR's `use_variational=False` concatenates ones as logvar (models/vae.py AutoencoderKL.encode).
  use_variational: bool = True
  resamp_with_conv: bool = True
  # LDM ResnetBlock option: a 3x3 `conv_shortcut` instead of the 1x1 `nin_shortcut`.
  use_conv_shortcut: bool = False
  give_pre_end: bool = False
  tanh_out: bool = False
  # Dropout is inference-off in a frozen tokenizer; kept only to document the ddconfig.
  dropout: float = 0.0

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def from_ddconfig(cls, ddconfig: dict, embed_dim: int, **overrides) -> "KLVAEConfig":
    """Builds from an LDM-style ddconfig (one attn_resolutions used for the encoder only,
    as in MAR, whose Decoder default is ()) unless overrides say otherwise."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ddconfig.items()
              if k in known}
    if "attn_resolutions" in ddconfig:
      kwargs["encoder_attn_resolutions"] = tuple(ddconfig["attn_resolutions"])
    kwargs["embed_dim"] = embed_dim
    kwargs.update(overrides)
    return cls(**kwargs)


# `config.tokenizer.architecture` -> the VAE it names.
ARCHITECTURES = {
    # MAR's production KL-16 (kl16.ckpt): 16x16 latents of 16 channels at 256px.
    "kl16": KLVAEConfig(),
    # The golden tiny VAE (vae_tiny.npz): KL-16's structure and stride 16 (encoder attention in
    # the last level, decoder mid-block only) at width 32 and one block per level, so tests and
    # CPU runs can use a real VAE.
    "kl16_tiny": KLVAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1,
                             encoder_attn_resolutions=(4,), resolution=64),
}


def _conv(features: int, kernel: int, name: Optional[str], precision, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  # PyTorch Conv2d(k, stride, padding=k//2) unless the caller pads itself (Downsample).
  if padding is None:
    padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 precision=precision, name=name)


def _group_norm(name: str) -> nn.GroupNorm:
  # LDM Normalize(): GroupNorm(32, eps=1e-6, affine=True). Two-pass variance, as PyTorch does,
  # rather than Flax's default E[x^2]-E[x]^2 which loses digits.
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


def _swish(x):
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  """LDM ResnetBlock with temb_channels=0: x + conv2(drop(swish(norm2(conv1(swish(norm1 x))))))."""
  out_channels: int
  use_conv_shortcut: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, "conv1", self.precision)(_swish(_group_norm("norm1")(x)))
    # Dropout is identity in eval mode, the only mode a frozen tokenizer runs in.
    h = _conv(self.out_channels, 3, "conv2", self.precision)(_swish(_group_norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      if self.use_conv_shortcut:
        x = _conv(self.out_channels, 3, "conv_shortcut", self.precision)(x)
      else:
        x = _conv(self.out_channels, 1, "nin_shortcut", self.precision)(x)
    return x + h


class AttnBlock(nn.Module):
  """LDM AttnBlock: one head over the H*W positions, 1x1 q/k/v/proj_out, scale C^-1/2, residual."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _group_norm("norm")(x)
    q = _conv(c, 1, "q", self.precision)(h).reshape(b, hgt * wid, c)
    k = _conv(c, 1, "k", self.precision)(h).reshape(b, hgt * wid, c)
    v = _conv(c, 1, "v", self.precision)(h).reshape(b, hgt * wid, c)
    # w[b, i, j] = <q_i, k_j> * C^-0.5, softmax over keys j (torch: softmax(dim=2)).
    w = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision) * (c ** -0.5)
    w = jax.nn.softmax(w, axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v, precision=self.precision).reshape(b, hgt, wid, c)
    return x + _conv(c, 1, "proj_out", self.precision)(h)


class Downsample(nn.Module):
  """LDM Downsample: asymmetric zero pad (right/bottom by 1) then 3x3 stride-2 conv, padding 0;
  or 2x2 average pooling without conv."""
  with_conv: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      # torch.nn.functional.pad(x, (0, 1, 0, 1)): no padding on the left/top.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return _conv(x.shape[-1], 3, "conv", self.precision, stride=2, padding="VALID")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """LDM Upsample: nearest-neighbour x2 (F.interpolate mode='nearest'), then optional 3x3 conv."""
  with_conv: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv(x.shape[-1], 3, "conv", self.precision)(x)
    return x


class _Level(nn.Module):
  """One resolution level (`down.<i>` / `up.<i>`): res blocks, optional attention, resampler."""
  out_channels: int
  num_blocks: int
  with_attn: bool
  resample: Optional[str]  # "down", "up" or None (last encoder level / decoder level 0).
  cfg: KLVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.cfg.use_conv_shortcut, self.precision,
                      name=f"block_{i}")(x)
      if self.with_attn:
        x = AttnBlock(self.precision, name=f"attn_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.cfg.resamp_with_conv, self.precision, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.cfg.resamp_with_conv, self.precision, name="upsample")(x)
    return x


class _Mid(nn.Module):
  """`mid`: block_1, attn_1, block_2 (always present in encoder and decoder)."""
  channels: int
  cfg: KLVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.cfg.use_conv_shortcut, self.precision, name="block_1")(x)
    x = AttnBlock(self.precision, name="attn_1")(x)
    return ResnetBlock(self.channels, self.cfg.use_conv_shortcut, self.precision,
                       name="block_2")(x)


class Encoder(nn.Module):
  """LDM Encoder: images [B, H, W, in_channels] -> [B, H/f, W/f, (2 if double_z) * z_channels]."""
  cfg: KLVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _conv(cfg.ch, 3, "conv_in", self.precision)(x)
    resolution = cfg.resolution
    num_levels = len(cfg.ch_mult)
    for i, mult in enumerate(cfg.ch_mult):
      last = i == num_levels - 1
      h = _Level(cfg.ch * mult, cfg.num_res_blocks,
                 resolution in cfg.encoder_attn_resolutions, None if last else "down", cfg,
                 self.precision, name=f"down_{i}")(h)
      if not last:
        resolution //= 2
    h = _Mid(h.shape[-1], cfg, self.precision, name="mid")(h)
    h = _swish(_group_norm("norm_out")(h))
    out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    return _conv(out, 3, "conv_out", self.precision)(h)


class Decoder(nn.Module):
  """LDM Decoder: z [B, h, w, z_channels] -> images [B, h*f, w*f, out_ch].

  Levels run from the lowest resolution up, each with num_res_blocks + 1 blocks; `up_<i>` is
  indexed by level like the PyTorch `up.<i>` (up.0 = full resolution, run last).
  """
  cfg: KLVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    h = _conv(cfg.ch * cfg.ch_mult[-1], 3, "conv_in", self.precision)(z)
    h = _Mid(h.shape[-1], cfg, self.precision, name="mid")(h)
    resolution = cfg.resolution // cfg.downsample_factor
    for i in reversed(range(len(cfg.ch_mult))):
      h = _Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1,
                 resolution in cfg.decoder_attn_resolutions, "up" if i != 0 else None, cfg,
                 self.precision, name=f"up_{i}")(h)
      if i != 0:
        resolution *= 2
    if cfg.give_pre_end:
      return h
    h = _swish(_group_norm("norm_out")(h))
    h = _conv(cfg.out_ch, 3, "conv_out", self.precision)(h)
    return jnp.tanh(h) if cfg.tanh_out else h


class AutoencoderKL(nn.Module):
  """MAR models/vae.py AutoencoderKL (NHWC). `__call__` runs encode then decode(mean) so that
  `init` creates every parameter; use `apply(..., method=...)` for the parts."""
  cfg: KLVAEConfig
  precision: Any = None

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg, self.precision)
    self.decoder = Decoder(cfg, self.precision)
    moments = 2 * cfg.embed_dim if cfg.use_variational else cfg.embed_dim
    # Flax names setup-assigned submodules after the attribute (no name= allowed here).
    self.quant_conv = _conv(moments, 1, None, self.precision)
    self.post_quant_conv = _conv(cfg.z_channels, 1, None, self.precision)

  def encode_moments(self, images):
    """Returns (encoder output h, moments = quant_conv(h) before the logvar clamp)."""
    h = self.encoder(images)
    return h, self.quant_conv(h)

  def encode(self, images):
    """Posterior parameters (mean, logvar, std), each [B, h, w, embed_dim]."""
    _, moments = self.encode_moments(images)
    return posterior_from_moments(moments, self.cfg.use_variational)

  def decode(self, latents):
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, images):
    mean, _, _ = self.encode(images)
    return self.decode(mean)


def posterior_from_moments(moments, use_variational: bool = True):
  """DiagonalGaussianDistribution(moments): mean, logvar (clamped to [-30, 20]), std.

  Channels split in half on the last axis (torch.chunk(2, dim=1) in NCHW). MAR's
  use_variational=False appends ones as the logvar half.
  """
  if use_variational:
    mean, logvar = jnp.split(moments, 2, axis=-1)
  else:
    mean, logvar = moments, jnp.ones_like(moments)
  logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
  return mean, logvar, jnp.exp(0.5 * logvar)


def init_params(cfg: KLVAEConfig, rng, image_size: Optional[int] = None):
  """Random parameters (only for tests/shape checks; real use loads converted weights)."""
  size = image_size or cfg.resolution
  return AutoencoderKL(cfg).init(rng, jnp.zeros((1, size, size, cfg.in_channels)))["params"]


def param_shapes(cfg: KLVAEConfig):
  """The parameter tree as ShapeDtypeStructs, without computing anything."""
  f = cfg.downsample_factor
  return jax.eval_shape(
      lambda: AutoencoderKL(cfg).init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, f, f, cfg.in_channels)))["params"])


def params_fingerprint(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes: names the exact weights, so a
  latent cache can be tied to the VAE that wrote it wherever the weights were loaded from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype.str}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class KLVAETokenizer:
  """Frozen KL VAE tokenizer keeping arjax's tokenizer contract (see arjax/tokenizers).

  encode: images [B, H, W, C] in [-1, 1] -> posterior mean (or, given `rng`, a posterior sample
  mean + std * N(0, 1), what MAR trains on) times `latent_scale`, patchified into tokens
  [B, (h/p)*(w/p), embed_dim*p*p] in raster order with MAR's feature order
  `c*p*p + pi*p + qi` (channel slowest, mar.py `patchify`). decode is the inverse: unpatchify,
  divide by `latent_scale`, AutoencoderKL.decode. Decoded images are not clamped.

  The encoder's raw output is split out as `moments` (quant_conv output, [B, h, w, 2*embed_dim]:
  mean then logvar, before the clamp, MAR's `posterior.parameters`) so a latent cache can store
  it and `encode_moments` finish the job at training time with the same tokens `encode` gives.
  `sample_posterior` tells the train step to pass an rng (MAR trains on samples).

  `params` are held, never trained: they are closed over as constants by jitted callers.
  eq=False keeps the (dict-holding) dataclass hashable by identity.
  """
  params: Any
  config: KLVAEConfig = KLVAEConfig()
  image_size: int = 256
  patch_size: int = 1
  latent_scale: float = MAR_LATENT_SCALE
  precision: Any = None
  sample_posterior: bool = False

  def __post_init__(self):
    f = self.config.downsample_factor * self.patch_size
    if self.image_size % f:
      raise ValueError(f"image_size={self.image_size} must be a multiple of the VAE stride "
                       f"{self.config.downsample_factor} times patch_size={self.patch_size}")

  @property
  def module(self) -> AutoencoderKL:
    return AutoencoderKL(self.config, self.precision)

  @property
  def value_range(self):
    """Gaussian latents are unbounded."""
    return None

  @property
  def grid(self) -> int:
    return self.image_size // (self.config.downsample_factor * self.patch_size)

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def token_dim(self) -> int:
    return self.config.embed_dim * self.patch_size * self.patch_size

  @property
  def moments_shape(self) -> tuple:
    """One image's moments: (h, w, 2*embed_dim), or (h, w, embed_dim) without use_variational."""
    side = self.image_size // self.config.downsample_factor
    width = self.config.embed_dim * (2 if self.config.use_variational else 1)
    return (side, side, width)

  def patchify(self, latents):
    """[B, h, w, C] latents -> [B, (h/p)*(w/p), C*p*p] tokens, MAR's order (see class doc)."""
    return patches.patchify(latents, self.patch_size, order="chw")

  def unpatchify(self, tokens):
    g = self.grid
    return patches.unpatchify(tokens, self.patch_size, g, g, self.config.embed_dim, order="chw")

  def moments(self, images):
    """Raw posterior moments [B, h, w, moments_shape[-1]] of images [B, H, W, C] in [-1, 1]."""
    expected = (self.image_size, self.image_size, self.config.in_channels)
    if tuple(images.shape[1:]) != expected:
      raise ValueError(f"images of shape {images.shape[1:]} given to a tokenizer for {expected}")
    _, moments = self.module.apply({"params": self.params}, images,
                                   method=AutoencoderKL.encode_moments)
    return moments

  def latents_from_moments(self, moments, rng=None):
    """Unscaled posterior mean (or sample mean + std * N(0, 1) given rng), [B, h, w, embed_dim]."""
    if tuple(moments.shape[1:]) != self.moments_shape:
      raise ValueError(f"moments of shape {moments.shape[1:]} given to a tokenizer for "
                       f"{self.moments_shape}")
    mean, _, std = posterior_from_moments(moments, self.config.use_variational)
    if rng is None:
      return mean
    return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)

  def latents(self, images, rng=None):
    """Unscaled posterior mean (or sample given rng), [B, h, w, embed_dim]."""
    return self.latents_from_moments(self.moments(images), rng)

  def encode(self, images, rng=None):
    return self.encode_moments(self.moments(images), rng)

  def encode_moments(self, moments, rng=None):
    """Tokens from cached moments: exactly what `encode` gives for the images they came from."""
    return self.patchify(self.latents_from_moments(moments, rng) * self.latent_scale)

  def decode(self, tokens):
    latents = self.unpatchify(tokens) / self.latent_scale
    return self.module.apply({"params": self.params}, latents, method=AutoencoderKL.decode)


class KLVAEKind(base.TokenizerKind):
  """`tokenizer.name='kl_vae'`: MAR's KL VAE, frozen; tokens are its scaled latents."""
  name = "kl_vae"
  caches_latents = True
  schema = {
      # .pth/.ckpt, .npz or .safetensors state dict, or an Orbax params directory; needed.
      "tokenizer.checkpoint": ((str, type(None)), None, ""),
      "tokenizer.architecture": ((str,), lambda v: v in ARCHITECTURES,
                                 f"one of {sorted(ARCHITECTURES)}"),
      "tokenizer.patch_size": ((int,), lambda v: v > 0, "> 0"),
      "tokenizer.latent_scale": ((float, int), lambda v: v > 0, "> 0"),
      "tokenizer.sample_posterior": ((bool,), None, ""),
  }

  def check(self, config):
    t, d = config.tokenizer, config.data
    vae = ARCHITECTURES[t.architecture]
    stride = vae.downsample_factor * t.patch_size
    if d.image_size % stride:
      raise ConfigError(
          f"config.data.image_size={d.image_size} must be a multiple of {stride}: the VAE stride "
          f"{vae.downsample_factor} (config.tokenizer.architecture={t.architecture!r}) times "
          f"config.tokenizer.patch_size={t.patch_size}")
    if d.channels != vae.in_channels:
      raise ConfigError(f"config.data.channels={d.channels}: the VAE "
                        f"config.tokenizer.architecture={t.architecture!r} reads "
                        f"{vae.in_channels}-channel images")

  def make(self, tok_cfg, data_cfg, *, abstract=False):
    if tok_cfg.architecture not in ARCHITECTURES:
      raise ConfigError(f"config.tokenizer.architecture={tok_cfg.architecture!r}: must be one of "
                        f"{sorted(ARCHITECTURES)}")
    vae_cfg = ARCHITECTURES[tok_cfg.architecture]
    params = param_shapes(vae_cfg) if abstract else load_params(tok_cfg)
    return KLVAETokenizer(params, vae_cfg, image_size=data_cfg.image_size,
                          patch_size=tok_cfg.patch_size, latent_scale=float(tok_cfg.latent_scale),
                          sample_posterior=tok_cfg.sample_posterior)

  def converters(self):
    # The converter imports this module's architectures (as load_params's reader does).
    from arjax.tokenizers import kl_vae_convert  # pylint: disable=import-outside-toplevel
    return (kl_vae_convert.KLVAEConverter(),)


def load_params(tok_cfg):
  """The weights `config.tokenizer.checkpoint` names, for `config.tokenizer.architecture`.

  Errors name the field and the path: ConfigError when unset or not that architecture's
  weights, FileNotFoundError when nothing is at the path.
  """
  # The weight files' readers import this module's architectures.
  from arjax.tokenizers import kl_vae_weights  # pylint: disable=import-outside-toplevel

  path = tok_cfg.checkpoint
  if path is None:
    raise ConfigError(
        "config.tokenizer.checkpoint is None: the KL VAE needs its weights (an .npz or "
        ".safetensors state dict, or a directory written by `python -m arjax convert`)")
  try:
    return kl_vae_weights.load_vae_params(path, ARCHITECTURES[tok_cfg.architecture])
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.tokenizer.checkpoint={path!r}: {e}") from e
  except ValueError as e:
    raise ConfigError(f"config.tokenizer.checkpoint={path!r} "
                      f"(config.tokenizer.architecture={tok_cfg.architecture!r}): {e}") from e
