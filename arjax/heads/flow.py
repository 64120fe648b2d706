"""Flow-matching head: a residual AdaLN MLP predicting velocity, and its ODE sampler.

The one time convention of arjax, written here and nowhere else:

    x_t = (1 - t) * x + t * noise,   t in [0, 1],   t = 0 data, t = 1 noise
    velocity target v = dx_t/dt = noise - x
    training t ~ logit-normal(mean, std)   (Esser et al. 2024, SD3)
    sampling integrates dx/dt = v from t = 1 (noise * temperature) to t = 0.

The same marginals p_t are those of a family of reverse-time SDEs (Song et al. 2021), one per
diffusion coefficient g(t): with the score of the linear path, s = -(x_t + (1 - t) v) / t,

    dx = [v - g^2/2 s] dt + g dW   integrated t: 1 -> 0.

`solver='euler_maruyama'` takes g(t)^2 = 2 c t, c = `diffusion_scale` (`sample.diffusion_scale`):
the drift is v + c (x + (1 - t) v), finite at every t, and the noise vanishes at t = 0 where the
data is. c = 1 is xAR's official SDE (arjax/families/xar/sampler.py: drift (2 - t) v + x);
c = 0 is the Euler ODE exactly. The grid is the ODE's uniform one; the last step (to t = 0)
draws no noise, so a sample ends on the drift's mean.

The network follows MAR's SimpleMLPAdaLN: x_t is projected to the head width,
then `depth` residual blocks whose LayerNorm is modulated (shift, scale, gate)
by c = embed(t) + proj(z); the modulation and output layers start at zero, so
an untrained head predicts v = 0 and training starts from a calm point.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from arjax.layers import adaln, dense as dense_lib
from arjax.heads.condition import fused_modulations, shared_condition
from arjax.heads import accounting, base
from arjax.heads import noise as noise_draws

Dtype = Any
NetFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class FlowHeadNet(nn.Module):
  """v = net(x_t [N, D], t [N], z [N or N/k, W]).

  t may be a scalar shared by all rows, as in sampling, where every row of an ODE step has
  the same t: the time MLP then runs on one row instead of N (the numbers are the same).
  z may hold one row per k consecutive rows of x_t, the training loss's batch_mul draws of
  one token: it is projected once per token (`heads.condition.shared_condition`).
  """
  token_dim: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0  # in the residual blocks, training only

  @nn.compact
  def __call__(self, x_t, t, z, extra=None):
    """`extra` [1 or N, width]: a further embedding added to the condition c (the shortcut
    head's step size, arjax/heads/shortcut.py)."""
    dense = lambda feats, axes, name: dense_lib.dense(feats, axes, dtype=self.dtype, name=name)
    t_emb = adaln.timestep_embedding(t, 256, time_scale=1000.0).astype(self.dtype)
    t_emb = dense(self.width, ("mlp", "mlp_out"), "time_mlp2")(
        nn.silu(dense(self.width, ("time", "mlp"), "time_mlp1")(t_emb)))
    h = dense(self.width, ("token", "mlp"), "input_proj")(x_t.astype(self.dtype))
    c = t_emb + shared_condition(
        dense(self.width, ("embed", "mlp_out"), "cond_proj")(z.astype(self.dtype)), h.shape[0])
    if extra is not None:
      c = c + extra.astype(self.dtype)
    if self.is_initializing():  # init creates each block's own Dense
      modulations = [None] * self.depth + [adaln.modulation_layer(
          self.width, 2, name="final_modulation", dtype=self.dtype)(nn.silu(c))]
    else:  # one matmul for every block's modulation (`heads.condition.fused_modulations`)
      modulations = fused_modulations(
          nn.meta.unbox(self.variables["params"]),
          [(f"block_{i}", "modulation") for i in range(self.depth)] + [("final_modulation",)],
          nn.silu(c), self.dtype)
    for i in range(self.depth):
      h = adaln.AdaLNResBlock(dtype=self.dtype, dropout=self.dropout, name=f"block_{i}")(
          h, c, modulations[i])
    v = adaln.modulated_output(h, modulations[-1], self.token_dim, name="output", dtype=self.dtype)
    return v.astype(jnp.float32)


SOLVERS = ("euler", "heun", "euler_maruyama")


def _integrate(velocity: Callable, x, steps: int, solver: str, *, diffusion_scale: float = 0.0,
               noise: Callable = None):
  """Integrates dx/dt = velocity(x, t) from t = 1 to t = 0 on a uniform grid; for
  'euler_maruyama' the reverse SDE of the module docstring, `noise(i)` step i's scaled draws."""
  ts = jnp.linspace(1.0, 0.0, steps + 1)

  def euler_maruyama(x, i):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    v = velocity(x, t)
    drift = v + diffusion_scale * (x + (1.0 - t) * v)
    # g sqrt(|dt|) with g^2 = 2 c t; none in the last step, which lands on t = 0.
    scale = jnp.where(i == steps - 1, 0.0, jnp.sqrt(2.0 * diffusion_scale * t * (-dt)))
    return x + dt * drift + scale * noise(i), None

  def euler(x, i):
    t, t_next = ts[i], ts[i + 1]
    return x + (t_next - t) * velocity(x, t), None

  def heun(x, i):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    v = velocity(x, t)
    x_euler = x + dt * v
    # Karras et al. 2022 drop the correction at t = 0; here t_next > 0 until the
    # last step, which takes the Euler value (the velocity at t = 0 is often the
    # worst-conditioned evaluation of the net).
    x_heun = x + 0.5 * dt * (v + velocity(x_euler, t_next))
    return jnp.where(i == steps - 1, x_euler, x_heun), None

  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; known: {SOLVERS}")
  step = {"euler": euler, "heun": heun, "euler_maruyama": euler_maruyama}[solver]
  x, _ = jax.lax.scan(step, x, jnp.arange(steps))
  return x


@dataclasses.dataclass(frozen=True)
class FlowMatching:
  """Rectified-flow head (linear path, velocity prediction). Holds config only."""
  token_dim: int
  batch_mul: int = 4          # noise/time draws per z (MAR's diffusion_batch_mul)
  t_mean: float = 0.0         # logit-normal location
  t_std: float = 1.0          # logit-normal scale
  solver: str = "heun"        # 'euler' | 'heun' | 'euler_maruyama' (module docstring)
  diffusion_scale: float = 1.0  # the SDE's c in g(t)^2 = 2 c t ('euler_maruyama' only)

  def sample_t(self, rng, n):
    return jax.nn.sigmoid(self.t_mean + self.t_std * jax.random.normal(rng, (n,)))

  def loss(self, net_fn: NetFn, x, z, rng):
    """Per-token loss [N]: mean over batch_mul draws of ||v_pred - (noise - x)||^2 / D."""
    n = x.shape[0]
    # Repeat each row in place (not tile) so the batch axis stays major and its
    # sharding over the mesh survives the reshape.
    # z stays one row per token: the net projects it once and shares it over the draws.
    x = jnp.repeat(x.astype(jnp.float32), self.batch_mul, axis=0)
    t_rng, noise_rng = jax.random.split(rng)
    t = self.sample_t(t_rng, x.shape[0])
    noise = jax.random.normal(noise_rng, x.shape)
    x_t = (1.0 - t[:, None]) * x + t[:, None] * noise
    err = net_fn(x_t, t, z) - (noise - x)
    per_draw = jnp.mean(jnp.square(err), axis=-1)
    return per_draw.reshape(n, self.batch_mul).mean(axis=1)

  def sample(self, net_fn: NetFn, z, rng, *, cfg_scale=None, temperature=1.0, steps: int = 16,
             cfg_interval=(0.0, 1.0)):
    """Draws x [N, D] given z.

    With `cfg_scale` (a scalar, may be traced), z is [2N, W]: conditional rows
    first, null-class rows second. Both halves integrate the same x, and the
    velocity is v_u + cfg_scale * (v_c - v_u) while t lies in `cfg_interval`,
    plain v_c outside it (guidance limited to an interval of noise levels,
    Kynkaanniemi et al. 2024: guiding at the noisiest t mostly costs
    diversity). `temperature` scales the initial noise. `rng` is one key or one key per
    row [N] (`arjax.heads.noise`); the ODE itself draws nothing, the SDE draws step i's noise
    from fold_in(rng, i + 1), scaled by `temperature` as the initial noise is.
    """
    guided = cfg_scale is not None
    n = z.shape[0] // 2 if guided else z.shape[0]
    x = temperature * noise_draws.normal(rng, n, (self.token_dim,))

    def velocity(x, t):
      xx = jnp.concatenate([x, x]) if guided else x
      v = net_fn(xx, t, z)  # scalar t: the time MLP runs once per evaluation, not per row
      if not guided:
        return v
      v_cond, v_uncond = jnp.split(v, 2)
      lo, hi = cfg_interval
      scale = jnp.where((t >= lo) & (t <= hi), cfg_scale, 1.0)
      return v_uncond + scale * (v_cond - v_uncond)

    noise = lambda i: temperature * noise_draws.normal(
        noise_draws.fold_in(rng, i + 1), n, (self.token_dim,))
    return _integrate(velocity, x, steps, self.solver, diffusion_scale=self.diffusion_scale,
                      noise=noise)


class FlowHead(base.Head):
  """`head.name='flow'`: FlowHeadNet + FlowMatching, the logit-normal time law in config."""
  name = "flow"
  schema = {
      **base.NETWORK_SCHEMA,
      "head.t_mean": ((float, int), None, ""),
      "head.t_std": ((float, int), lambda v: v > 0, "> 0"),
  }

  def build(self, config, *, token_dim, cond_width, dtype):
    h = config.head
    return (FlowHeadNet(token_dim=token_dim, width=h.width, depth=h.depth, dtype=dtype,
                        dropout=h.dropout),
            FlowMatching(token_dim=token_dim, batch_mul=h.batch_mul, t_mean=h.t_mean,
                         t_std=h.t_std))

  def evaluations_per_token(self, config, num_steps=None):
    steps = config.sample.num_steps if num_steps is None else num_steps
    return accounting.ode_evaluations(steps, config.sample.solver)

  def flops(self, config, *, token_dim, cond_width, mode, tokens, calls=1, num_steps=None):
    if mode == "train":
      return accounting.training(config.head, tokens, token_dim, cond_width, token_dim)
    evals = self.evaluations_per_token(config, num_steps)
    return accounting.sampling(tokens * evals, calls * evals, token_dim, cond_width,
                               config.head, token_dim)
