"""Golden checks of MAR's DDPM head (run by `tests/test_golden_mar.py`).

On whichever of these keys a golden file holds (see the golden README):
  * `out/net_*` from `in/net_*` (`MarMLPAdaLN`, intermediates from Flax's captured outputs);
  * `out/{train,gen}_diffusion/*`, `out/cosine_betas_raw_1000` (float64 tables, host-side);
  * `out/gen_pmv_*` (p_mean_variance at every respaced step), `out/train_*`
    (training_losses), `out/forward_loss` (MAR.forward_loss with injected draws);
  * `out/cfg_net_raw`, `out/forward_with_cfg`, `out/cfg_pmv_*` (CFG);
  * the replayed `DiffLoss.sample` calls of sample_tokens (`out/sample_*/iter*/diffloss_sample`
    from the recorded z rows, cfg and noise). With CFG MAR samples both halves and keeps the
    first: `MarDiffusion.sample` returns that half, and a test-side loop over the same
    primitives (`p_mean_variance`, `guided_output`) reproduces the discarded null half, whose
    variance channels and noise are its own.

`out/net_t_freq` is the tightest fit: float32 arguments reach ~1000 rad, so a 1-ulp `exp`
difference between libraries moves it by up to 6e-5 (README noise floor 4.8e-5 / 1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from arjax.heads import diffusion
from arjax.heads.mar_mlp import mar_timestep_embedding


def _net_fn(net, params):
  return lambda x, t, c: net.apply({"params": params}, x, t, c)


@functools.partial(jax.jit, static_argnames="net")
def _forward_with_cfg(params, x, t, c, cfg_scale, *, net):
  """(net on [x[:N]; x[:N]], forward_with_cfg's output)."""
  half = x[: x.shape[0] // 2]
  raw = _net_fn(net, params)(jnp.concatenate([half, half]), t, c)
  return raw, diffusion.guided_output(raw, cfg_scale, net.in_channels)


@functools.partial(jax.jit, static_argnames="net")
def _net_intermediates(params, x, t, c, *, net):
  """Every `out/net_*` quantity, by its golden name after `out/net_`."""
  out, state = net.apply({"params": params}, x, t, c, capture_intermediates=True)
  inter = state["intermediates"]
  found = {
      "t_freq": mar_timestep_embedding(t, net.frequency_embedding_size),
      "t_emb": inter["time_embed"]["__call__"][0],
      "c_emb": inter["cond_embed"]["__call__"][0],
      "x_proj": inter["input_proj"]["__call__"][0],
      "output": out,
  }
  for i in range(net.num_res_blocks):
    found[f"res_block{i}"] = inter[f"res_blocks_{i}"]["__call__"][0]
  return found


def _net_output(net_fn, x, net_t, c, cfg_scale, c_dim):
  """`net.forward` or, with a cfg scale, `forward_with_cfg` (net on [x[:N]; x[:N]])."""
  if cfg_scale is None:
    return net_fn(x, net_t, c)
  half = x[: x.shape[0] // 2]
  return diffusion.guided_output(net_fn(jnp.concatenate([half, half]), net_t, c), cfg_scale, c_dim)


@functools.partial(jax.jit, static_argnames=("net", "head"))
def _p_mean_variance_steps(params, x, c, steps, cfg_scale, *, net, head):
  """GEN p_mean_variance at each respaced index in `steps` (t = full(i)), stacked on axis 0."""
  sched = head.gen_diffusion()
  net_fn = _net_fn(net, params)

  def at(i):
    t = jnp.full((x.shape[0],), i)
    net_t = jnp.asarray(sched.timestep_map)[t]
    model_output = _net_output(net_fn, x, net_t, c, cfg_scale, net.in_channels)
    return dict(diffusion.p_mean_variance(sched, model_output, x, t), model_output=model_output,
                net_timesteps=net_t)
  return jax.lax.map(at, steps)


@functools.partial(jax.jit, static_argnames=("net", "head"))
def _training_losses(params, x_start, t, c, noise, *, net, head):
  return diffusion.training_losses(head.train_diffusion, _net_fn(net, params), x_start, t, c,
                                   noise)


@functools.partial(jax.jit, static_argnames=("net", "head"))
def _forward_loss(params, x, z, mask, t, noise, *, net, head):
  per_token = head.loss(_net_fn(net, params), x, z, jax.random.PRNGKey(0), t=t, noise=noise)
  return jnp.sum(per_token * mask) / jnp.sum(mask)


@functools.partial(jax.jit, static_argnames=("net", "head", "guided"))
def _head_sample(params, z, cfg_scale, temperature, init_noise, step_noise, *, net, head,
                 guided):
  return head.sample(_net_fn(net, params), z, None, cfg_scale=cfg_scale if guided else None,
                     temperature=temperature, noise=(init_noise, step_noise))


@functools.partial(jax.jit, static_argnames=("net", "head"))
def _null_half(params, z, cfg_scale, temperature, init_noise, step_noise, *, net, head):
  """MAR's p_sample_loop with forward_with_cfg on all 2N rows, as recorded; the null half.

  The net only ever sees the cond half x[:N], so the null rows follow the cond trajectory's
  guided eps with their own variance channels and noise draws.
  """
  sched = head.gen_diffusion()
  net_fn = _net_fn(net, params)
  x = jnp.concatenate([init_noise, init_noise])  # DiffLoss.sample: cat([noise, noise])

  def step(x, j):
    i = sched.num_timesteps - 1 - j
    t = jnp.full((x.shape[0],), i)
    net_t = jnp.asarray(sched.timestep_map)[t]
    out = diffusion.p_mean_variance(
        sched, _net_output(net_fn, x, net_t, z, cfg_scale, net.in_channels), x, t)
    # MAR's p_sample, in its order: mean + nonzero * exp(0.5 * log_var) * noise * temperature.
    nonzero = (t != 0).astype(jnp.float32)[:, None]
    noise = nonzero * jnp.exp(0.5 * out["log_variance"]) * step_noise[j]
    return out["mean"] + noise * temperature, None

  x, _ = jax.lax.scan(step, x, jnp.arange(sched.num_timesteps))
  return x[init_noise.shape[0]:]


def check_head(check, imported):
  net, head, params = imported.net, imported.head, imported.params["head"]
  train, gen = head.train_diffusion, head.gen_diffusion()

  if "in/net_x_t" in check:
    check.compare_found("out/net_", _net_intermediates(
        params, check["in/net_x_t"], check["in/net_t"], check["in/net_c"], net=net))

  # Schedules (float64, host-side); whatever table a file holds must be a known one.
  for name, sched in (("train_diffusion", train), ("gen_diffusion", gen)):
    for key in check.keys(f"out/{name}/"):
      table = key.rsplit("/", 1)[1]
      if table in diffusion.SCHEDULE_KEYS or table == "timestep_map":
        check.compare(key, getattr(sched, table))
      else:
        check.fail(key, "no arjax counterpart known to this check")
  if "out/cosine_betas_raw_1000" in check:
    check.compare("out/cosine_betas_raw_1000",
                  diffusion.get_named_beta_schedule("cosine", 1000))

  # p_mean_variance at every respaced step (GEN diffusion, wrapped timesteps).
  if "in/pmv_t_index" in check:
    out = _p_mean_variance_steps(params, check["in/net_x_t"], check["in/net_c"],
                                 check["in/pmv_t_index"], None, net=net, head=head)
    check.compare_found("out/gen_pmv_", out, per_step=True)

  # training_losses with explicit noise (TRAIN diffusion).
  if "in/train_t" in check:
    terms = _training_losses(params, check["in/train_x_start"], check["in/train_t"],
                             check["in/net_c"], check["in/train_noise"], net=net, head=head)
    terms["q_sample"] = terms["x_t"]
    check.compare_found("out/train_", terms, exclude=["out/train_diffusion/"])

  # MAR.forward_loss through the head's `loss` contract, with the injected draws. MAR tiles
  # rows copy-major (row k*N + r); `MarDiffusion.loss` repeats in place (row r*m + k).
  if "out/forward_loss" in check:
    m = head.batch_mul
    x = check["in/x"].reshape(-1, net.in_channels)
    z = check["out/decoder_z"].reshape(x.shape[0], -1)
    n = x.shape[0]
    t = check["in/forward_loss_t"].reshape(m, n).T.reshape(-1)
    noise = check["in/forward_loss_noise"].reshape(m, n, -1).transpose(1, 0, 2).reshape(n * m, -1)
    mask = check["in/mask"].reshape(-1).astype(np.float32)
    check.compare("out/forward_loss", _forward_loss(params, x, z, mask, t, noise, net=net,
                                                    head=head))

  # forward_with_cfg, and p_mean_variance through it.
  if "in/cfg_x" in check:
    x, t, c, scale = check["in/cfg_x"], check["in/cfg_t"], check["in/cfg_c"], check["in/cfg_scale"]
    raw, guided = _forward_with_cfg(params, x, t, c, scale, net=net)
    if "out/cfg_net_raw" in check:
      check.compare("out/cfg_net_raw", raw)
    if "out/forward_with_cfg" in check:
      check.compare("out/forward_with_cfg", guided)
    if check.keys("out/cfg_pmv_"):
      out = _p_mean_variance_steps(params, x, c, np.arange(gen.num_timesteps), scale, net=net,
                                   head=head)
      check.compare_found("out/cfg_pmv_", out, per_step=True)

  # The replayed DiffLoss.sample calls of sample_tokens: the recorded z rows, cfg and noise.
  # Rows are independent (and a CFG half's row r pairs only with the other half's row r), so
  # each half is zero-padded to the run's largest count: one program serves every iteration.
  for run in sorted({k.split("/")[1] for k in check.keys("in/sample_")}):
    temperature = np.float32(check[f"in/{run}/settings"][2])
    keys = [k for k in check.keys(f"out/{run}/iter") if k.endswith("/diffloss_sample")]
    size = max((check[k].shape[0] for k in keys), default=0)
    for key in keys:
      prefix = key[: -len("/diffloss_sample")]
      noise_prefix = "in/" + prefix[len("out/"):]
      cfg = check[f"{prefix}/cfg_iter"]
      guided = float(cfg) != 1.0  # DiffLoss.sample: `if not cfg == 1.0` -> forward_with_cfg
      halves = 2 if guided else 1
      n = check[key].shape[0] // halves
      pad = functools.partial(_pad_halves, n=n, size=size // halves if guided else size)
      args = (params, pad(check[f"{prefix}/z"], halves), cfg, temperature,
              pad(check[f"{noise_prefix}/init_noise"], 1),
              pad(check[f"{noise_prefix}/step_noise"], halves, axis=1))
      sample = np.asarray(_head_sample(*args, net=net, head=head, guided=guided))
      check.compare(key, sample[:n], rows=slice(0, n) if guided else None)
      if guided:
        null = np.asarray(_null_half(*args, net=net, head=head))
        check.compare(key, null[:n], rows=slice(n, 2 * n))


def _pad_halves(a, halves, *, n, size, axis=0):
  """`a` split into `halves` blocks of n rows along `axis`, each zero-padded to `size` rows."""
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - n)
  return np.concatenate([np.pad(block, widths) for block in np.split(a, halves, axis=axis)],
                        axis=axis)
