"""The random draws of a head's sampler, from one key or from one key per row.

A head's `sample` takes `rng` either as one key, from which all N rows are drawn together
(row i's noise then depends on N and on i's place in the batch), or as a batch of keys [N],
one per row, from which row i's draws are made with key i alone. The samplers pass keys
derived from (seed, image index), so that an image is the same whatever batch it is sampled
in (see `arjax.sampling.base.image_keys`). With one key, every function here is exactly the
`jax.random` call it replaces, so existing single-key results do not change.
"""
import jax


def is_per_row(rng) -> bool:
  """Whether `rng` is a batch of keys (raw uint32 [N, 2] or typed [N]) rather than one key."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def split(rng):
  """Two independent keys (or key batches) from `rng`: `jax.random.split`, row by row."""
  if is_per_row(rng):
    pairs = jax.vmap(jax.random.split)(rng)
    return pairs[:, 0], pairs[:, 1]
  first, second = jax.random.split(rng)
  return first, second


def fold_in(rng, data):
  """`jax.random.fold_in(rng, data)`, row by row for a batch of keys."""
  if is_per_row(rng):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, data)
  return jax.random.fold_in(rng, data)


def fold_in_each(rng, data):
  """Keys [len(data)]: `jax.random.fold_in(rng, d)` for each d of the int array `data`."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, data)


def normal(rng, num_rows: int, row_shape: tuple):
  """Standard normal [num_rows, *row_shape]; with per-row keys, row i is drawn from key i."""
  if is_per_row(rng):
    if rng.shape[0] != num_rows:
      raise ValueError(f"{rng.shape[0]} per-row keys for {num_rows} rows")
    return jax.vmap(lambda key: jax.random.normal(key, row_shape))(rng)
  return jax.random.normal(rng, (num_rows, *row_shape))
