"""The head plug-in: what a per-token head tells the rest of arjax.

A head models p(x_token | z). It comes in two parts, built together by `Head.build`:

  * the network, a flax module `net(x_t, t, z) -> output` that lives in the model's parameter
    tree under 'head' (the backbone's family puts it there);
  * the algorithm, a frozen dataclass holding configuration only, never parameters:

        algorithm.loss(net_fn, x [N, D], z [N or N/k, W], rng) -> per-token loss [N]
        algorithm.sample(net_fn, z [N, W] (or [2N, W] under CFG), keys, *, cfg_scale,
                         temperature, steps, cfg_interval) -> x [N, D]

    (the full contract, shared time and per-row keys, is in `arjax/heads/__init__.py`).

Heads that need more conditioning than (x_t, t, z) take it as keyword arguments of `loss` and
`sample` with defaults (a few-step head's step size `d`; a speculative decoder's request for
the log-density of a proposed token, `log_density(net_fn, x, z, keys, ...)`), so a family that
does not know them still drives the head through the common call.

A head also accounts for its own cost (`flops`), so `bench`, `describe` and the start-up
summary count it without knowing which head it is.
"""
import abc
from typing import Any, Dict

from arjax.config.schema import Plugin, positive, probability

# The fields of a head that is a small network on top of z (flow, MAR's DDPM, shortcut): such a
# head's `schema` starts from these. A family without a head ('none') has none of them.
NETWORK_SCHEMA = {
    "head.width": ((int,), positive, "> 0"),
    "head.depth": ((int,), positive, "> 0"),
    # Noise/time draws per backbone output z in training (MAR's diffusion_batch_mul).
    "head.batch_mul": ((int,), positive, "> 0"),
    # Dropout in the head's residual blocks, in training only; 0 = none.
    "head.dropout": ((float, int), probability, "in [0, 1)"),
}


class Head(Plugin, abc.ABC):
  """A per-token head: its config fields (`name` is `config.head.name`; `schema` its own
  `config.head.*` fields, `NETWORK_SCHEMA`'s among them for a network head), its network and
  algorithm, its FLOPs."""

  #: Whether `config.sample.solver` applies (an ODE head) or its steps are fixed (DDPM).
  uses_solver: bool = True

  @abc.abstractmethod
  def build(self, config, *, token_dim: int, cond_width: int, dtype) -> tuple:
    """(network module, algorithm) for tokens of `token_dim` conditioned on z of `cond_width`."""

  @abc.abstractmethod
  def evaluations_per_token(self, config, num_steps=None) -> int:
    """Network evaluations to sample one token with `config.sample` (ODE or DDPM steps), or
    with `num_steps` steps instead of `sample.num_steps` (a DiSA schedule's unit)."""

  @abc.abstractmethod
  def flops(self, config, *, token_dim: int, cond_width: int, mode: str, tokens: int,
            calls: int = 1, num_steps=None) -> int:
    """Model FLOPs of the head on `tokens` tokens: mode 'train' (forward + backward of the
    loss, batch_mul draws each) or 'sample' (`evaluations_per_token(config, num_steps)`
    evaluations each, in `calls` network calls that share one t)."""

  def summary(self, config) -> str:
    """The head in `describe`'s model line."""
    return f"head {config.head.name} {config.head.width} x {config.head.depth}"

  def describe(self, config) -> Dict[str, Any]:
    """Extra figures for `describe` (optional)."""
    return {}
