"""`head.name='none'`: no per-token head, for families whose backbone is the whole token model.

xAR's Transformer is itself the flow model: it takes the noisy entities and the time and
outputs a velocity per token, so there is no small network on top of a z. Such a family
selects this head; its `build` gives (None, None) (the family's model holds no 'head'
subtree), it costs nothing, and the sampler's network calls per token are the family's
`sample.num_steps` (Heun: twice). Its config is `head.name` alone: the network fields of the
other heads (width, depth, batch_mul, dropout: `base.NETWORK_SCHEMA`) are unknown keys here.
"""
from arjax.heads import base


class NoHead(base.Head):
  name = "none"
  schema = {}
  uses_solver = True

  def build(self, config, *, token_dim: int, cond_width: int, dtype) -> tuple:
    return None, None

  def evaluations_per_token(self, config, num_steps=None) -> int:
    s = config.sample
    return (s.num_steps if num_steps is None else num_steps) * (2 if s.solver == "heun" else 1)

  def summary(self, config) -> str:
    return "no per-token head"

  def flops(self, config, *, token_dim: int, cond_width: int, mode: str, tokens: int,
            calls: int = 1, num_steps=None) -> int:
    return 0
