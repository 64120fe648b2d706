"""Decoding in slots: what a family hands the serving engine for continuous batching.

A `SlotDecoder` draws images in a fixed number of batch slots. Each slot holds one image in the
making: its class, its key (`image_keys`: fold_in(request key, image index)), its guidance
scales and temperature, how far it has got (a position, an iteration) and its cache or
recurrent state. `step` advances every slot by one unit of the family's generation order
(a token position, a MAR iteration) in ONE compiled program of static shapes; the engine
admits a new image into a free slot between steps (`admit`: that slot's prefill) and reads a
slot's image when it has taken `num_units` steps (`image`). Slots nobody owns are computed
too (static shapes) and their results ignored: a slot's rows never mix with another's.

Because an image's randomness comes from its key and the unit index alone, an image drawn in
a slot equals the one the family's sampler draws for the same (class, seed, index, settings),
whatever the other slots hold (up to float reduction order, as tests/test_determinism.py
bounds it for batch splits).

A family supplies one through `Family.slot_decoder(sampler, num_slots)` (arjax/families/base.py);
one that cannot raises `SlotsUnsupported` saying why, and the server then batches per request.
"""
import abc
from typing import Any

import numpy as np


class SlotsUnsupported(NotImplementedError):
  """A family (or a sampler setting) that cannot decode in slots; the message says why."""


class SlotDecoder(abc.ABC):
  """Slots of one sampler (one head-step count: it is static inside the head's ODE scan).

  The state is a pytree the engine threads through `admit` and `step` (which may donate it);
  only the engine's scheduler thread touches it.
  """
  #: Slots in one compiled step.
  num_slots: int
  #: Steps from admission to a finished image (the causal family's token count).
  num_units: int
  #: The widths `step` is compiled for, ascending, the last `num_slots`: the engine steps the
  #: narrowest that holds every live slot (it fills the lowest free slots first), so a lightly
  #: loaded server does not pay for empty slots. Each width is one program, compiled at start.
  step_widths: tuple = ()

  @abc.abstractmethod
  def guidance_scales(self, cfg_scale: float, cfg_schedule_name: str) -> np.ndarray:
    """float32 [num_units]: the CFG scale at each unit (host numpy; the sampler's own)."""

  @abc.abstractmethod
  def init(self) -> Any:
    """The state of `num_slots` empty slots."""

  @abc.abstractmethod
  def admit(self, params, state, slot: int, *, label: int, seed: int, index: int,
            scales: np.ndarray, temperature: float) -> Any:
    """State with slot `slot` starting image `index` of a request with key PRNGKey(seed)."""

  @abc.abstractmethod
  def step(self, params, state, width: int) -> Any:
    """State with slots [0, width) one unit further (`width` one of `step_widths`); the
    others are left as they are."""

  @abc.abstractmethod
  def image(self, state, slot: int):
    """Slot `slot`'s image, float32 [H, W, C] in [-1, 1] (valid after `num_units` steps)."""
