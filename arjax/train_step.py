"""The pure training step: (state, batch) -> (state, metrics), jitted with explicit shardings."""
import functools

import jax
import jax.numpy as jnp
import optax

from arjax import sharding
from arjax.models.ar_model import ARModel
from arjax.train_state import TrainState, ema_decay_at, learning_rate_schedule


def drop_labels(labels, rng, rate: float, null_class: int):
  """Replaces a `rate` share of labels by the null class (classifier-free guidance training)."""
  drop = jax.random.uniform(rng, labels.shape) < rate
  return jnp.where(drop, null_class, labels)


def loss_fn(params, model, head, tokens, labels, rng):
  """Mean flow-matching loss over every token of the batch."""
  z = model.apply({"params": params}, tokens, labels, method=ARModel.condition)
  b, t, d = tokens.shape
  net_fn = lambda x_t, tt, zz: model.apply({"params": params}, x_t, tt, zz, method=ARModel.head_net)
  per_token = head.loss(net_fn, tokens.reshape(b * t, d), z.reshape(b * t, -1), rng)
  return per_token.mean()


def train_step(state: TrainState, batch, *, model, head, tokenizer, optimizer, config):
  rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, head_rng = jax.random.split(rng)
  tokens = tokenizer.encode(batch["image"])
  labels = drop_labels(batch["label"], drop_rng, config.model.label_drop, config.data.num_classes)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, model, head, tokens, labels, head_rng)
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
