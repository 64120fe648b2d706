"""The causal family's slot decoder: every slot its own position and KV cache, one step for all.

A slot is the sampler's guided batch of one image: two cache rows, the class and the null
class (`sample_tokens`' rows b and B + b), fed the same token. `step` is `token_step`, the body
of the sampler's scan, `jax.vmap`ped over slots, each slot at its own position: the position
indexes the slot's position embedding, its cache write and its CFG scale, and its key is
fold_in(image key, position), the sampler's draw for that image at that position (`step` runs
the first `width` slots only, one program per width in `step_widths`). So a slot
draws what `Sampler` draws for (class, seed, index, settings) whichever positions the other
slots are at (up to float reduction order: a batch of 2 rows, not 2B).

Every slot runs guided: a request with cfg_scale = 1 gets v_u + 1 * (v_c - v_u), which is the
unguided sampler's v_c up to one rounding per ODE step; one program then serves every
request. A slot past its last position that lies inside the stepped width keeps stepping at
its clamped last position (static shapes); its results are ignored until the engine admits a
new image there.
"""

import jax
import jax.numpy as jnp

from arjax.families.causal.model import ARModel
from arjax.families.causal.sampler import token_step
from arjax.heads import noise as noise_draws
from arjax.sampling import step_schedule
from arjax.sampling.base import cfg_schedule
from arjax.sampling.slots import SlotDecoder, SlotsUnsupported


class CausalSlots(SlotDecoder):
  """Slots of a causal `Sampler` (arjax/families/causal/sampler.py), constant head steps."""

  def __init__(self, sampler, num_slots: int):
    if step_schedule.parse(sampler.head_step_schedule) != "constant":
      # Per-position step counts would differ between slots at different positions, and the
      # count is static inside the head's ODE scan.
      raise SlotsUnsupported(
          f"sample.head_step_schedule={sampler.head_step_schedule!r}: slots decode with a "
          "constant head step count only")
    self.sampler, self.num_slots = sampler, num_slots
    self.model, self.tokenizer = sampler.model, sampler.tokenizer
    self.num_units = self.tokenizer.num_tokens
    self.step_widths = tuple(sorted({max(1, num_slots // 4), max(1, num_slots // 2), num_slots}))
    self._admit = jax.jit(self._admit_slot, donate_argnums=(1,))
    self._step = jax.jit(self._step_slots, donate_argnums=(1,), static_argnums=(2,))
    self._image = jax.jit(self._slot_image)

  def guidance_scales(self, cfg_scale, cfg_schedule_name):
    return cfg_schedule(cfg_scale, cfg_schedule_name, self.num_units)

  def init(self):
    s, t, d = self.num_slots, self.num_units, self.tokenizer.token_dim
    backbone = self.model.backbone
    cache = backbone.init_cache(2, jnp.float32)  # the sampler's cache dtype
    return {
        "key": jnp.zeros((s, 2), jnp.uint32),
        "position": jnp.full((s,), t, jnp.int32),  # empty slots sit past the end
        "scales": jnp.ones((s, t), jnp.float32),
        "temperature": jnp.ones((s,), jnp.float32),
        "z": jnp.zeros((s, 2, backbone.width), jnp.float32),
        "cache": jax.tree.map(lambda c: jnp.zeros((s,) + c.shape, c.dtype), cache),
        "tokens": jnp.zeros((s, t, d), jnp.float32),
    }

  # --- the jitted programs (slot, label, seed, index: traced, so one compilation each) ---

  def _admit_slot(self, params, state, slot, label, seed, index, scales, temperature):
    labels = jnp.stack([label, jnp.int32(self.model.backbone.num_classes)])  # class, null
    cache = self.model.backbone.init_cache(2, jnp.float32)
    z, cache = self.model.apply({"params": params}, labels, cache, method=ARModel.prefill)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)  # `image_keys`' key
    new = {"key": key, "position": jnp.int32(0), "scales": scales,
           "temperature": temperature, "z": z, "cache": cache,
           "tokens": jnp.zeros_like(state["tokens"][0])}
    return jax.tree.map(lambda whole, one: whole.at[slot].set(one.astype(whole.dtype)),
                        state, new)

  def _step_slots(self, params, state, width):
    s = self.sampler
    last = self.num_units - 1

    def one_slot(key, position, scales, temperature, z, cache, tokens):
      at = jnp.minimum(position, last)  # a finished slot idles at its last position
      keys = noise_draws.fold_in(key[None], at)  # [1]: the sampler's per-row draw
      token, z_next, cache = token_step(
          params, z, cache, at, keys, scales[at], temperature, model=self.model,
          head=s.head_for_sampling, guided=True, num_steps=s.num_steps,
          cfg_interval=tuple(s.cfg_interval), value_range=s.value_range)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, token[0], at, 0)
      return position + 1, z_next, cache, tokens

    live = jax.tree.map(lambda x: x[:width], state)  # slots [0, width)
    position, z, cache, tokens = jax.vmap(one_slot)(
        live["key"], live["position"], live["scales"], live["temperature"], live["z"],
        live["cache"], live["tokens"])
    stepped = dict(live, position=position, z=z, cache=cache, tokens=tokens)
    return jax.tree.map(lambda whole, part: whole.at[:width].set(part), state, stepped)

  def _slot_image(self, state, slot):
    return self.tokenizer.decode(state["tokens"][slot][None])[0]

  # --- the interface ---

  def admit(self, params, state, slot, *, label, seed, index, scales, temperature):
    return self._admit(params, state, jnp.int32(slot), jnp.int32(label), jnp.int32(seed),
                       jnp.int32(index), jnp.asarray(scales, jnp.float32),
                       jnp.float32(temperature))

  def step(self, params, state, width):
    return self._step(params, state, width)

  def image(self, state, slot):
    return self._image(state, jnp.int32(slot))


def slot_decoder(sampler, num_slots: int) -> CausalSlots:
  return CausalSlots(sampler, num_slots)
