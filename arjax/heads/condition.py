"""How the head networks take their condition z: per row, or shared by a token's draws."""
import jax.numpy as jnp


def shared_condition(cond_embedding, rows: int):
  """A projected condition [M, W] for `rows` = k * M rows: row r gets cond_embedding[r // k].

  The heads' training draws k = batch_mul (noise, t) pairs per token, all with that token's z:
  projecting z once per token and repeating the projection is the same per-row arithmetic as
  projecting k repeated copies, at 1/k of the matmul (the repeat's transpose sums the k
  copies' gradients). M == rows is the plain per-row case.
  """
  m = cond_embedding.shape[0]
  if m == rows:
    return cond_embedding
  if m == 0 or rows % m:
    raise ValueError(f"the head's condition has {m} rows for {rows} rows of x_t: expected "
                     f"{rows} or a divisor of it (one condition per batch_mul draws)")
  return jnp.repeat(cond_embedding, rows // m, axis=0)


def fused_modulations(params, paths, activated, dtype):
  """Every AdaLN modulation of a head net, `Dense(activated)` per block, as one matmul.

  All of a head's modulation layers read the same SiLU(condition): their kernels, side by
  side, make one [W, sum of outputs] matmul instead of one per block (for MAR's DDPM net 4
  small matmuls, 55% of its FLOPs; bigger matmuls run closer to the machine's peak, above
  all the few rows of a sampling step). The numbers are each Dense's own: column j of the
  product is column j of that block's matmul, plus its bias.

  params: the net's (unboxed) parameters; paths: one tuple of keys per Dense, in block
  order, e.g. ("res_blocks_0", "adaLN_modulation_1"). Returns one [N, out] array per path.
  """
  def leaf(path, name):
    node = params
    for key in path:
      node = node[key]
    return node[name]

  kernels = [leaf(path, "kernel") for path in paths]
  kernel = jnp.concatenate(kernels, axis=1).astype(dtype)
  bias = jnp.concatenate([leaf(path, "bias") for path in paths]).astype(dtype)
  out = jnp.dot(activated.astype(dtype), kernel) + bias
  splits, total = [], 0
  for k in kernels[:-1]:
    total += k.shape[1]
    splits.append(total)
  return jnp.split(out, splits, axis=-1)
