"""The pure training step: (state, batch) -> (state, metrics), jitted with explicit shardings."""
import functools

import jax
import jax.numpy as jnp
import optax

from arjax.parallel import sharding
from arjax.training.state import TrainState, ema_decay_at, learning_rate_schedule


# fold_in constant of the tokenizer's posterior noise: its own stream beside the loss's rng.
_TOKENIZER_STREAM = 0x70C


def training_tokens(tokenizer, batch, rng):
  """The tokens one step trains on: from `batch['image']`, or from cached `batch['moments']`
  (arjax/data/latents.py); a posterior sample when the tokenizer asks for one.

  Both sources give the same tokens for the same image and rng. Deterministic tokenizers
  (Patchify) get no rng, so their path stays exactly what it was.
  """
  tok_rng = None
  if getattr(tokenizer, "sample_posterior", False):
    tok_rng = jax.random.fold_in(rng, _TOKENIZER_STREAM)
  if "moments" in batch:
    return tokenizer.encode_moments(batch["moments"], tok_rng)
  if tok_rng is None:
    return tokenizer.encode(batch["image"])
  return tokenizer.encode(batch["image"], tok_rng)


def train_step(state: TrainState, batch, *, loss_fn, tokenizer, optimizer, config):
  """loss_fn(params, tokens, labels, rng) -> scalar: the model family's objective."""
  rng = jax.random.fold_in(state.rng, state.step)
  tokens = training_tokens(tokenizer, batch, rng)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, batch["label"], rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, config.train.ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  # A NaN/Inf loss or gradient skips the update: parameters, EMA and optimizer moments stay
  # as they were (a select, so a finite step's numbers are exactly the unguarded ones). The
  # step still advances, so the next try draws new noise, masks and data. A finite gradient
  # can still give a non-finite update (an overflowing learning rate, damaged optimizer
  # moments), so the update's norm is checked too: from a finite state, finite gradients and
  # a finite update, the new parameters, EMA and moments are finite, so the state never holds
  # a NaN/Inf, and neither does any checkpoint of it. (One scalar like grad_norm, rather than
  # an isfinite reduction per array: those cost a cross-device reduction each when sharded.)
  update_norm = optax.tree.norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": learning_rate_schedule(config.train)(state.step),
      "skipped": 1 - finite.astype(jnp.int32),
  }
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
  return new_state, metrics


def jit_train_step(state_shardings, mesh, rules, **static):
  """The step jitted over `mesh`: state in/out on its rule shardings (donated), batch split on
  batch axes, activations as the rules say (`sharding.activation_rules`)."""
  step = sharding.shard_activations(functools.partial(train_step, **static), mesh, rules)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
