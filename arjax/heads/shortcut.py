"""Shortcut head (`head.name='shortcut'`): a flow head that also knows the step size it takes.

FAR (Hang et al. 2025, "Fast Autoregressive Models for Continuous Latent Generation") puts a
shortcut model (Frans et al. 2024, "One Step Diffusion via Shortcut Models") on top of the AR
backbone, so that a token is sampled in 1-4 head evaluations instead of 50-100. The network
is the flow head's (`FlowHeadNet`) with one more condition, the step size d, embedded like t
and added to c; it predicts s(x_t, t, d), the average velocity over a step of size d, so that

    x_{t-d} = x_t - d s(x_t, t, d)          (arjax's time: t = 1 noise -> t = 0 data)

At d = 0, s is the flow's velocity v. Training draws `batch_mul` (x_t, t, d) per token, of
two kinds:

  * flow matching, d = 0: t logit-normal, target noise - x (the flow head's loss);
  * self-consistency, a share `head.shortcut_fraction` of the draws (Frans et al.'s 1/4): a
    level l uniform in 1 .. L (`head.shortcut_levels`), d = 2^-l, t uniform on the grid of the
    full step 2d (t in {2d, 4d, ..., 1}); the target for s(x_t, t, 2d) is the stop-gradient
    mean of two half steps, (s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)) / 2: two steps
    of d make one of 2d. At the smallest level the half steps query d = 0 (the flow
    velocity), which anchors the ladder of step sizes to flow matching.

The share is realised per token: round(fraction x batch_mul) of each token's draws are
self-consistency draws (one of four at the defaults), so both kinds see every z; with a
fraction of 0 the head is a flow head with a step input it never uses.

Sampling (`sample.num_steps` = K): K steps of size d = 1/K on the uniform grid, one network
evaluation each; the step sizes the loss trains are powers of two (1, 1/2, ... 2^-L; the
embedding of d is continuous, so other K run, untrained). CFG and temperature act as in the
flow head. The network's time argument is the pair (t, d), so a family drives this head
through the same `net_fn(x_t, t, z)` as any other.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.config.schema import positive
from arjax.errors import ConfigError
from arjax.heads import accounting, base
from arjax.heads import noise as noise_draws
from arjax.heads.flow import FlowHeadNet
from arjax.layers import adaln, dense as dense_lib
from arjax.util.flops import matmul

Dtype = Any
NetFn = Callable[[jax.Array, Any, jax.Array], jax.Array]


class ShortcutHeadNet(nn.Module):
  """s = net(x_t [N, D], (t, d), z): `FlowHeadNet` (as 'velocity') with the step size d
  embedded by its own MLP and added to the net's condition. t, d: [N] or scalars (a plain t:
  d = 0). The step
  MLP's output layer starts at zero: an untrained shortcut net is its flow net for every d."""
  token_dim: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_t, time, z):
    # A plain t (what a family's model.init passes any head net) is the step size 0: v.
    t, d = time if isinstance(time, (tuple, list)) else (time, jnp.zeros_like(time))
    dense = lambda feats, axes, name, zero=False: dense_lib.dense(
        feats, axes, dtype=self.dtype, name=name, zero=zero)
    d_emb = adaln.timestep_embedding(d, accounting.TIME_EMBED_DIM,
                                     time_scale=1000.0).astype(self.dtype)
    d_emb = dense(self.width, ("mlp", "mlp_out"), "step_mlp2", zero=True)(
        nn.silu(dense(self.width, ("time", "mlp"), "step_mlp1")(d_emb)))
    return FlowHeadNet(token_dim=self.token_dim, width=self.width, depth=self.depth,
                       dtype=self.dtype, dropout=self.dropout, name="velocity")(
                           x_t, t, z, extra=d_emb)


def consistency_target(net_fn: NetFn, x_t, t, d, z, *, smallest: bool | jax.Array = False):
  """The self-consistency target of s(x_t, t, 2d): the mean of two half steps of size d
  (stop-gradient). `smallest` (per row): query the half steps at d = 0, the flow velocity."""
  d_query = jnp.where(smallest, 0.0, d)
  first = net_fn(x_t, (t, d_query), z)
  x_mid = x_t - d[:, None] * first
  second = net_fn(x_mid, (t - d, d_query), z)
  return jax.lax.stop_gradient(0.5 * (first + second))


@dataclasses.dataclass(frozen=True)
class Shortcut:
  """The shortcut algorithm (module docstring). Holds config only."""
  token_dim: int
  batch_mul: int = 4
  t_mean: float = 0.0
  t_std: float = 1.0
  fraction: float = 0.25       # share of draws trained on self-consistency
  levels: int = 7              # step sizes 2^-1 .. 2^-levels in the consistency draws

  @property
  def consistency_draws(self) -> int:
    """Self-consistency draws per token (the rest are flow matching)."""
    return int(round(self.fraction * self.batch_mul))

  def loss(self, net_fn: NetFn, x, z, rng):
    """Per-token loss [N]: mean over the batch_mul draws of ||s_pred - target||^2 / D."""
    n, dim = x.shape
    k = self.consistency_draws
    m = self.batch_mul
    # Draw-major inside each token: x[:, :k] self-consistency, x[:, k:] flow matching; each
    # part is contiguous per token, so the nets share one projection of z over its draws.
    x = jnp.broadcast_to(x.astype(jnp.float32)[:, None], (n, m, dim))
    fm_rng, sc_rng = jax.random.split(rng)
    losses = []
    if k:
      losses.append(self._consistency_loss(net_fn, x[:, :k].reshape(n * k, dim), z,
                                           sc_rng).reshape(n, k))
    if m - k:
      losses.append(self._flow_loss(net_fn, x[:, k:].reshape(n * (m - k), dim), z,
                                    fm_rng).reshape(n, m - k))
    return jnp.concatenate(losses, axis=1).mean(axis=1)

  def _flow_loss(self, net_fn, x, z, rng):
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.nn.sigmoid(self.t_mean + self.t_std * jax.random.normal(t_rng, (x.shape[0],)))
    noise = jax.random.normal(noise_rng, x.shape)
    x_t = (1.0 - t[:, None]) * x + t[:, None] * noise
    err = net_fn(x_t, (t, jnp.zeros_like(t)), z) - (noise - x)
    return jnp.mean(jnp.square(err), axis=-1)

  def _consistency_loss(self, net_fn, x, z, rng):
    rows = x.shape[0]
    level_rng, t_rng, noise_rng = jax.random.split(rng, 3)
    level = jax.random.randint(level_rng, (rows,), 1, self.levels + 1)
    d = jnp.exp2(-level.astype(jnp.float32))
    # t on the grid of the full step 2d: j * 2d, j in 1 .. 1 / (2d) = 2^(level - 1).
    j = jax.random.randint(t_rng, (rows,), 1, jnp.left_shift(1, level - 1) + 1)
    t = j.astype(jnp.float32) * 2.0 * d
    noise = jax.random.normal(noise_rng, x.shape)
    x_t = (1.0 - t[:, None]) * x + t[:, None] * noise
    target = consistency_target(net_fn, x_t, t, d, z, smallest=level == self.levels)
    err = net_fn(x_t, (t, 2.0 * d), z) - target
    return jnp.mean(jnp.square(err), axis=-1)

  def sample(self, net_fn: NetFn, z, rng, *, cfg_scale=None, temperature=1.0, steps: int = 1,
             cfg_interval=(0.0, 1.0)):
    """Draws x [N, D] given z in `steps` shortcut steps of size 1/steps (CFG, temperature and
    per-row keys as `FlowMatching.sample`)."""
    guided = cfg_scale is not None
    n = z.shape[0] // 2 if guided else z.shape[0]
    x = temperature * noise_draws.normal(rng, n, (self.token_dim,))
    ts = jnp.linspace(1.0, 0.0, steps + 1)
    d = jnp.float32(1.0 / steps)
    lo, hi = cfg_interval

    def step(x, i):
      t = ts[i]
      s = net_fn(jnp.concatenate([x, x]) if guided else x, (t, d), z)
      if guided:
        s_cond, s_uncond = jnp.split(s, 2)
        scale = jnp.where((t >= lo) & (t <= hi), cfg_scale, 1.0)
        s = s_uncond + scale * (s_cond - s_uncond)
      return x + (ts[i + 1] - t) * s, None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps))
    return x


def _step_mlp(rows: int, width: int) -> int:
  """The step-size MLP (256 -> W -> W) on `rows` rows."""
  return matmul(rows, accounting.TIME_EMBED_DIM, width) + matmul(rows, width, width)


class ShortcutHead(base.Head):
  """`head.name='shortcut'`: ShortcutHeadNet + Shortcut (module docstring)."""
  name = "shortcut"
  uses_solver = False  # its own fixed-step sampler: sample.solver does not apply
  schema = {
      **base.NETWORK_SCHEMA,
      "head.t_mean": ((float, int), None, ""),
      "head.t_std": ((float, int), positive, "> 0"),
      # Share of each token's batch_mul draws trained on self-consistency (Frans et al.: 1/4).
      "head.shortcut_fraction": ((float, int), lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      # Consistency step sizes 2^-1 .. 2^-levels; the smallest half steps query d = 0.
      "head.shortcut_levels": ((int,), positive, "> 0"),
  }

  def check(self, config):
    h = config.head
    k = int(round(h.shortcut_fraction * h.batch_mul))
    if h.shortcut_fraction > 0 and not 1 <= k <= h.batch_mul - 1:
      raise ConfigError(
          f"config.head.shortcut_fraction={h.shortcut_fraction} of config.head.batch_mul="
          f"{h.batch_mul} draws per token rounds to {k} self-consistency draws: needs between "
          f"1 and batch_mul - 1 (raise batch_mul or change the fraction)")

  def build(self, config, *, token_dim, cond_width, dtype):
    h = config.head
    return (ShortcutHeadNet(token_dim=token_dim, width=h.width, depth=h.depth, dtype=dtype,
                            dropout=h.dropout),
            Shortcut(token_dim=token_dim, batch_mul=h.batch_mul, t_mean=h.t_mean, t_std=h.t_std,
                     fraction=h.shortcut_fraction, levels=h.shortcut_levels))

  def evaluations_per_token(self, config, num_steps=None):
    return config.sample.num_steps if num_steps is None else num_steps

  def flops(self, config, *, token_dim, cond_width, mode, tokens, calls=1, num_steps=None):
    h = config.head
    if mode == "train":
      rows = tokens * h.batch_mul
      consistency_rows = tokens * int(round(h.shortcut_fraction * h.batch_mul))
      # Every draw forward + backward (the step MLP's input is data: its first layer 2x),
      # and the consistency draws' two target evaluations forward only.
      backprop = (accounting.training(h, tokens, token_dim, cond_width, token_dim)
                  + 2 * matmul(rows, accounting.TIME_EMBED_DIM, h.width)
                  + 3 * matmul(rows, h.width, h.width))
      target = 2 * (sum(accounting.head_net(consistency_rows, token_dim, cond_width, h.width,
                                            h.depth, token_dim, cond_rows=tokens))
                    + _step_mlp(consistency_rows, h.width))
      return backprop + target
    evals = self.evaluations_per_token(config, num_steps)
    # One step size per call: the step MLP, like the time MLP, runs once per call.
    return (accounting.sampling(tokens * evals, calls * evals, token_dim, cond_width, h,
                                token_dim) + _step_mlp(calls * evals, h.width))
