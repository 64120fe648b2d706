"""MAR's DDPM head algorithm (ADM/DiT `GaussianDiffusion` as MAR configures it), in JAX.

Sources: github.com/LTH14/mar `diffusion/gaussian_diffusion.py`, `diffusion/respace.py`,
`diffusion/diffusion_utils.py`, `diffusion/__init__.py` (`create_diffusion`) and
`models/diffloss.py` (`DiffLoss`), themselves DiT's copy of OpenAI's ADM code.

What MAR uses, and so what is implemented:
  * cosine beta schedule, T = 1000, computed host-side in float64 numpy exactly as
    `get_named_beta_schedule` / `GaussianDiffusion.__init__` do, then respaced
    (`space_timesteps` + `SpacedDiffusion`); both the training diffusion (respacing "" =
    all T steps, but with betas recomputed as 1 - ac[i]/ac[i-1]) and the sampling diffusion
    (respacing e.g. "100") are `SpacedDiffusion`s;
  * EPSILON prediction, LEARNED_RANGE variance (net output [eps | v], 2*C channels),
    loss MSE + VB (`training_losses`, VB on the stop-gradient eps);
  * `_extract_into_tensor` casts the float64 tables to float32 before any arithmetic: the
    tables become float32 constants here, and every op runs in float32 in the same order;
  * the net always sees `timestep_map[i]` (original 0..999 integer), never the respaced
    index (MAR's `_WrappedModel` has `rescale_timesteps` commented out);
  * `p_sample_loop` with `clip_denoised=False` and the temperature on the per-step noise
    (MAR's modified `p_sample`); CFG is MAR's `SimpleMLPAdaLN.forward_with_cfg`.

Head contract (see `arjax.heads`): `MarDiffusion` holds configuration only;
`net_fn(x_t, t, z)` is `MarMLPAdaLN` with its params bound, t the original-scale timestep.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from arjax.heads import accounting, base
from arjax.heads import noise as noise_draws

NetFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


# ----------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """gaussian_diffusion.py `betas_for_alpha_bar`: Python floats, element by element."""
  betas = []
  for i in range(num_diffusion_timesteps):
    t1 = i / num_diffusion_timesteps
    t2 = (i + 1) / num_diffusion_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """gaussian_diffusion.py `get_named_beta_schedule` (float64)."""
  if schedule_name == "linear":
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
  if schedule_name == "cosine":
    # math.cos, not np.cos: the reference evaluates each alpha_bar with Python's libm.
    return betas_for_alpha_bar(
        num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set:
  """respace.py `space_timesteps`: which original steps a respaced diffusion keeps.

  "ddimN" picks the integer stride giving N steps; otherwise comma-separated counts per
  equal section, each section strided by (size-1)/(count-1) accumulated as a float and
  rounded with Python's `round` (half to even), as in the original.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim"):])
      for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired_count:
          return set(range(0, num_timesteps, i))
      raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"cannot divide section of {size} steps into {section_count}")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(section_count):
      taken_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    all_steps += taken_steps
    start_idx += size
  return set(all_steps)


class DiffusionSchedule:
  """The float64 tables of one `GaussianDiffusion` (names as in gaussian_diffusion.py),
  plus `timestep_map` (respaced index -> original timestep, int64) of its SpacedDiffusion."""

  def __init__(self, betas: np.ndarray, timestep_map: np.ndarray):
    # GaussianDiffusion.__init__, line by line (DiT/MAR version).
    betas = np.array(betas, dtype=np.float64)
    assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
    self.num_timesteps = int(betas.shape[0])
    self.betas = betas
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    # The posterior variance is 0 at the first step: the log is clipped by reusing step 1.
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:])
    ) if len(self.posterior_variance) > 1 else np.array([])
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))
    self.timestep_map = np.asarray(timestep_map, dtype=np.int64)

  def f32(self, name: str) -> jax.Array:
    """The table as float32 constants (`_extract_into_tensor`'s `.float()` before use)."""
    return jnp.asarray(np.asarray(getattr(self, name)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def spaced_diffusion(respacing: str = "", num_timesteps: int = 1000,
                     noise_schedule: str = "cosine") -> DiffusionSchedule:
  """`create_diffusion(timestep_respacing, noise_schedule)` (diffusion/__init__.py) tables.

  respacing "" keeps all steps (MAR's train_diffusion); "100" etc. is MAR's gen_diffusion.
  """
  base_betas = get_named_beta_schedule(noise_schedule, num_timesteps)
  use_timesteps = space_timesteps(num_timesteps, respacing or [num_timesteps])
  # respace.py SpacedDiffusion.__init__: new betas from the kept steps' alphas_cumprod.
  base = DiffusionSchedule(base_betas, np.arange(num_timesteps))
  last_alpha_cumprod = 1.0
  new_betas, timestep_map = [], []
  for i, alpha_cumprod in enumerate(base.alphas_cumprod):
    if i in use_timesteps:
      new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
      last_alpha_cumprod = alpha_cumprod
      timestep_map.append(i)
  return DiffusionSchedule(np.array(new_betas), np.array(timestep_map))


# --------------------------------------------------------------------- diffusion algebra


def _at(sched: DiffusionSchedule, name: str, t):
  """`_extract_into_tensor(arr, t, x.shape)` for 2-D x: float32 value per row, [N, 1]."""
  return sched.f32(name)[t][:, None]


def q_sample(sched: DiffusionSchedule, x_start, t, noise):
  """gaussian_diffusion.py `q_sample`: sqrt(ac_t) x0 + sqrt(1 - ac_t) noise."""
  return (_at(sched, "sqrt_alphas_cumprod", t) * x_start
          + _at(sched, "sqrt_one_minus_alphas_cumprod", t) * noise)


def q_posterior_mean_variance(sched: DiffusionSchedule, x_start, x_t, t):
  """gaussian_diffusion.py `q_posterior_mean_variance` -> (mean, variance, log_variance_clipped)."""
  mean = (_at(sched, "posterior_mean_coef1", t) * x_start
          + _at(sched, "posterior_mean_coef2", t) * x_t)
  shape = x_t.shape
  variance = jnp.broadcast_to(_at(sched, "posterior_variance", t), shape)
  log_variance = jnp.broadcast_to(_at(sched, "posterior_log_variance_clipped", t), shape)
  return mean, variance, log_variance


def p_mean_variance(sched: DiffusionSchedule, model_output, x, t):
  """gaussian_diffusion.py `p_mean_variance` for EPSILON / LEARNED_RANGE, clip_denoised=False.

  Takes the net's output ([eps | v], 2*C channels) rather than the net, so callers control
  how (and with which timesteps) the net was evaluated. v is not clamped (as in the original).
  Returns dict(mean, variance, log_variance, pred_xstart, eps).
  """
  c = x.shape[-1]
  eps, model_var_values = model_output[:, :c], model_output[:, c:]
  min_log = _at(sched, "posterior_log_variance_clipped", t)
  # np.log(self.betas) in float64, then the float32 cast of _extract_into_tensor.
  max_log = jnp.asarray(np.log(sched.betas).astype(np.float32))[t][:, None]
  frac = (model_var_values + 1) / 2
  log_variance = frac * max_log + (1 - frac) * min_log
  # _predict_xstart_from_eps.
  pred_xstart = (_at(sched, "sqrt_recip_alphas_cumprod", t) * x
                 - _at(sched, "sqrt_recipm1_alphas_cumprod", t) * eps)
  mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x, t)
  return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance,
          "pred_xstart": pred_xstart, "eps": eps}


def normal_kl(mean1, logvar1, mean2, logvar2):
  """diffusion_utils.py `normal_kl` (nats, elementwise)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """diffusion_utils.py `approx_standard_normal_cdf` (tanh approximation)."""
  return 0.5 * (1.0 + jnp.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """diffusion_utils.py `discretized_gaussian_log_likelihood`: bins of +-1/255, open edges."""
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min,
                             jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def training_losses(sched: DiffusionSchedule, net_fn: NetFn, x_start, t, z, noise):
  """gaussian_diffusion.py `training_losses` (loss_type MSE, LEARNED_RANGE, EPSILON).

  t: respaced indices [N] (int); the net sees `timestep_map[t]`. Returns a dict with the
  per-row `loss` = `mse` + `vb` and the intermediates (x_t, model_output, q_posterior_*).
  """
  x_start = x_start.astype(jnp.float32)
  x_t = q_sample(sched, x_start, t, noise)
  model_output = net_fn(x_t, jnp.asarray(sched.timestep_map)[t], z)
  c = x_t.shape[-1]
  eps = model_output[:, :c]
  # The VB term trains only the variance: `frozen_out = cat([model_output.detach(), v])`.
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), model_output[:, c:]], axis=-1)
  true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x_start, x_t, t)
  out = p_mean_variance(sched, frozen, x_t, t)
  # _vb_terms_bpd: KL for t > 0, discretized decoder NLL at t == 0, both in bits.
  kl = jnp.mean(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]),
                axis=-1) / np.float32(np.log(2.0))
  decoder_nll = jnp.mean(-discretized_gaussian_log_likelihood(
      x_start, out["mean"], 0.5 * out["log_variance"]), axis=-1) / np.float32(np.log(2.0))
  vb = jnp.where(t == 0, decoder_nll, kl)
  mse = jnp.mean((noise - eps) ** 2, axis=-1)  # mean_flat((target - model_output) ** 2).
  return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t, "model_output": model_output,
          "q_posterior_mean": true_mean, "q_posterior_log_variance": true_log_variance}


def guided_output(model_output, cfg_scale, c: int):
  """`SimpleMLPAdaLN.forward_with_cfg` on the net output of `[x[:N]; x[:N]]` with [cond; null] z.

  eps: uncond + s * (cond - uncond), copied to both halves; the variance channels stay the
  raw per-row ones (cond rows keep cond v, null rows null v).
  """
  eps, rest = model_output[:, :c], model_output[:, c:]
  cond_eps, uncond_eps = jnp.split(eps, 2)
  half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
  return jnp.concatenate([jnp.concatenate([half_eps, half_eps]), rest], axis=-1)


# ------------------------------------------------------------------------------ the head


@dataclasses.dataclass(frozen=True)
class MarDiffusion:
  """MAR's DiffLoss algorithm (DDPM, cosine, eps + learned-range variance). Config only."""
  token_dim: int
  batch_mul: int = 4                 # MAR's diffusion_batch_mul
  num_sampling_steps: str = "100"    # MAR's num_sampling_steps (gen_diffusion respacing)
  num_timesteps: int = 1000          # create_diffusion's diffusion_steps
  noise_schedule: str = "cosine"

  @property
  def train_diffusion(self) -> DiffusionSchedule:
    return spaced_diffusion("", self.num_timesteps, self.noise_schedule)

  def gen_diffusion(self, steps: Optional[Union[int, str]] = None) -> DiffusionSchedule:
    respacing = str(self.num_sampling_steps if steps is None else steps)
    return spaced_diffusion(respacing, self.num_timesteps, self.noise_schedule)

  def loss(self, net_fn: NetFn, x, z, rng, *, t=None, noise=None):
    """Per-token loss [N]: mean over batch_mul draws of MAR's mse + vb.

    Each row is repeated in place (row r's draws are rows r*batch_mul .. r*batch_mul+m-1;
    MAR tiles copy-major instead, which only permutes rows: the mean is the same).
    `t` [N*batch_mul] (int) and `noise` [N*batch_mul, D] replace the random draws
    (`torch.randint` / `randn_like` in DiffLoss.forward / training_losses) when given.
    """
    n = x.shape[0]
    x = jnp.repeat(x.astype(jnp.float32), self.batch_mul, axis=0)
    # z stays one row per token: the net projects it once and shares it over the draws
    # (`heads.condition.shared_condition`).
    t_rng, noise_rng = jax.random.split(rng)
    sched = self.train_diffusion
    if t is None:
      t = jax.random.randint(t_rng, (x.shape[0],), 0, sched.num_timesteps)
    if noise is None:
      noise = jax.random.normal(noise_rng, x.shape)
    per_draw = training_losses(sched, net_fn, x, t, z, noise)["loss"]
    return per_draw.reshape(n, self.batch_mul).mean(axis=1)

  def sample(self, net_fn: NetFn, z, rng, *, cfg_scale=None, temperature=1.0,
             steps: Optional[Union[int, str]] = None, cfg_interval=(0.0, 1.0),
             noise: Optional[Tuple[Any, Any]] = None):
    """Draws x [N, D] given z with MAR's `p_sample_loop` (`DiffLoss.sample`).

    steps: the gen-diffusion respacing (static; default `num_sampling_steps`).
    With `cfg_scale` (scalar, may be traced) z is [2N, W], cond rows then null rows, and the
    net runs on [x; x] (`forward_with_cfg`); the cond half's trajectory is the result (MAR
    keeps the first half; the null half never feeds back into it). Guidance is applied where
    timestep_map[i] / (T - 1) lies in `cfg_interval` (default: every step, as in MAR), with
    scale 1 (i.e. the cond eps) elsewhere. `temperature` multiplies the per-step noise (MAR's p_sample),
    not the initial noise.
    noise: optional (init_noise [N, D], step_noise [S, rows, D]) replacing every draw:
      step_noise[j] is used at respaced index S-1-j (MAR's call order; entry S-1 is
      multiplied by 0); with CFG rows may be 2N (MAR's recorded draws), the first N are used.
    rng: one key, or one key per row [N] (`arjax.heads.noise`): then row i's initial
      and per-step draws come from key i alone.
    """
    sched = self.gen_diffusion(steps)
    num_steps = sched.num_timesteps
    guided = cfg_scale is not None
    n = z.shape[0] // 2 if guided else z.shape[0]
    c = self.token_dim
    if noise is None:
      init_rng, step_rng = noise_draws.split(rng)
      x = noise_draws.normal(init_rng, n, (c,))
      step_noise = None
    else:
      x = jnp.asarray(noise[0], jnp.float32)
      step_noise = jnp.asarray(noise[1], jnp.float32)[:, :n]
    timestep_map = jnp.asarray(sched.timestep_map)
    lo, hi = cfg_interval

    def step(x, j):
      i = num_steps - 1 - j
      t = jnp.full((n,), i)
      # One timestep for all rows: passed as a scalar, the net embeds it once, not per row.
      if guided:
        out = net_fn(jnp.concatenate([x, x]), timestep_map[i], z)
        t_frac = timestep_map[i] / (self.num_timesteps - 1)
        scale = jnp.where((t_frac >= lo) & (t_frac <= hi), cfg_scale, 1.0)
        model_output = guided_output(out, scale, c)[:n]
      else:
        model_output = net_fn(x, timestep_map[i], z)
      out = p_mean_variance(sched, model_output, x, t)
      eps_draw = (noise_draws.normal(noise_draws.fold_in(step_rng, j), n, (c,))
                  if step_noise is None else step_noise[j])
      nonzero_mask = (t != 0).astype(jnp.float32)[:, None]
      # MAR p_sample: mean + mask * exp(0.5 * log_var) * noise * temperature (same order).
      x = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * eps_draw * temperature
      return x, None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
    return x


class MarDiffusionHead(base.Head):
  """`head.name='mar_diffusion'`: MAR's DiffLoss (MarMLPAdaLN + MarDiffusion), which official
  MAR checkpoints import into; sampling steps are its respacing of config.sample.num_steps."""
  name = "mar_diffusion"
  uses_solver = False
  schema = {
      **base.NETWORK_SCHEMA,
      "head.num_timesteps": ((int,), lambda v: v > 0, "> 0"),
      "head.noise_schedule": ((str,), lambda v: v in ("cosine", "linear"),
                              "'cosine' or 'linear'"),
  }

  def build(self, config, *, token_dim, cond_width, dtype):
    from arjax.heads.mar_mlp import MarMLPAdaLN  # pylint: disable=import-outside-toplevel
    h = config.head
    net = MarMLPAdaLN(in_channels=token_dim, model_channels=h.width, z_channels=cond_width,
                      num_res_blocks=h.depth, dtype=dtype, num_timesteps=h.num_timesteps,
                      dropout=h.dropout)
    return net, MarDiffusion(token_dim=token_dim, batch_mul=h.batch_mul,
                             num_sampling_steps=str(config.sample.num_steps),
                             num_timesteps=h.num_timesteps, noise_schedule=h.noise_schedule)

  def evaluations_per_token(self, config, num_steps=None):
    return config.sample.num_steps if num_steps is None else num_steps

  def flops(self, config, *, token_dim, cond_width, mode, tokens, calls=1, num_steps=None):
    h = config.head
    if mode == "train":
      # The net embeds its integer timesteps as a table of num_timesteps rows when there are
      # more rows than that (`MarMLPAdaLN`).
      rows = tokens * h.batch_mul
      return accounting.training(h, tokens, token_dim, cond_width, 2 * token_dim,
                                 time_rows=min(rows, h.num_timesteps))
    evals = self.evaluations_per_token(config, num_steps)
    return accounting.sampling(tokens * evals, calls * evals, token_dim, cond_width, h,
                               2 * token_dim)
