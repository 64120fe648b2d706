"""The pure training step: (state, batch) -> (state, metrics), jitted with explicit shardings."""
import functools

import jax
import optax

from arjax import sharding
from arjax.train_state import TrainState, ema_decay_at, learning_rate_schedule


def train_step(state: TrainState, batch, *, loss_fn, tokenizer, optimizer, config):
  """loss_fn(params, tokens, labels, rng) -> scalar: the model family's objective."""
  rng = jax.random.fold_in(state.rng, state.step)
  tokens = tokenizer.encode(batch["image"])
  loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, batch["label"], rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, config.train.ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": learning_rate_schedule(config.train)(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


def jit_train_step(state_shardings, mesh, **static):
  """The step jitted over `mesh`: state in/out on its rule shardings (donated), batch split on batch axes."""
  step = functools.partial(train_step, **static)
  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
