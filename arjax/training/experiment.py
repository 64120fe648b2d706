"""Everything a config builds for compute: tokenizer, model, head, mesh, rules, optimizer.

Kept apart from the training loop so that code which only computes (the
sampler, `bench`, notebooks) needs no data pipeline or checkpoint stack.
"""
from arjax import registry
from arjax.config import schema as configs
from arjax.parallel import sharding
from arjax.sampling.base import ImageSampler
from arjax.training import state as train_state
from arjax.training import step as train_step


class Experiment:
  """Everything built from a config: tokenizer, model, head, mesh, optimizer."""

  def __init__(self, config, mesh=None):
    registry.validate(config)
    self.config = config
    self.family = registry.family(config)
    self.head_kind = registry.head(config)
    self.tokenizer = registry.make_tokenizer(config.tokenizer, config.data)
    self.model, self.head, self.loss_fn = registry.build_model(config, self.tokenizer)
    self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    self.rules = sharding.rules_from_config(config.sharding)
    self.optimizer = train_state.make_optimizer(config.train)
    self.example_tokens, self.example_labels = self.family.example_inputs(self.tokenizer)
    batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch = config.train.global_batch_size
    if batch % batch_devices:
      nearest = [b for b in (batch // batch_devices * batch_devices,
                             -(-batch // batch_devices) * batch_devices) if b > 0]
      raise configs.ConfigError(
          f"config.train.global_batch_size={batch} must be divisible by the {batch_devices} "
          f"devices of the mesh's batch axes (data x fsdp of config.mesh.shape="
          f"{tuple(config.mesh.shape)}): set --config.train.global_batch_size to a multiple of "
          f"{batch_devices} (nearest: {' or '.join(map(str, nearest))}), or choose a "
          f"config.mesh.shape whose data x fsdp divides {batch}")

  def init_state(self):
    return train_state.create(self.model, self.optimizer, self.example_tokens, self.example_labels,
                              self.config.seed, self.mesh, self.rules)

  def abstract_state(self):
    return train_state.abstract_state(self.model, self.optimizer, self.example_tokens,
                                      self.example_labels, self.mesh, self.rules)

  def jit_step(self, state_shardings):
    return train_step.jit_train_step(
        state_shardings, self.mesh, self.rules, loss_fn=self.loss_fn, tokenizer=self.tokenizer,
        optimizer=self.optimizer, config=self.config)

  def sampler(self):
    """The family's sampler: images = sampler(params, labels, rng, cfg_scale=..., ...)."""
    sampler = self.family.sampler(self.model, self.head, self.tokenizer, self.config)
    if isinstance(sampler, ImageSampler):  # its activations sharded as the rules say
      sampler.shard_activations(self.mesh, self.rules)
    return sampler
