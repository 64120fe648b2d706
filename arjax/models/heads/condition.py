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
