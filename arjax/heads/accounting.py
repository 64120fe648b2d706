"""FLOPs of the head networks (FlowHeadNet, MarMLPAdaLN: the same layer shapes), counted as
the networks compute them. Matmuls only; backward = 2 x forward except for layers whose
input is data (no input gradient)."""
from typing import Optional

from arjax.util.flops import matmul

# The heads' sinusoidal time-embedding size (`timestep_embedding(t, 256)`): the input width
# of their first time-MLP layer.
TIME_EMBED_DIM = 256


def head_net(rows: int, token_dim: int, cond_width: int, width: int, depth: int,
             out_dim: Optional[int] = None, *, cond_rows: Optional[int] = None,
             time_rows: Optional[int] = None):
  """One head-network evaluation on `rows` rows -> (FLOPs of layers fed by data, of all others).

  Layers: time MLP (256 -> Wh -> Wh), cond projection (W -> Wh), input
  projection (D -> Wh); per residual block the AdaLN modulation (Wh -> 3 Wh),
  fc1 and fc2 (Wh -> Wh); final modulation (Wh -> 2 Wh) and output (Wh -> D, or
  `out_dim`: 2D for MAR's DDPM net, whose second half is the variance).
  The first time-MLP layer and the input projection read data (t's embedding,
  x_t) that no parameter influences; backprop needs no gradient of their inputs.
  The cond projection runs on `cond_rows` (training: one per token, shared by its
  batch_mul draws) and the time MLP on `time_rows` (a timestep table's size); both
  default to `rows`.
  """
  cond_rows = rows if cond_rows is None else cond_rows
  time_rows = rows if time_rows is None else time_rows
  data_fed = matmul(time_rows, TIME_EMBED_DIM, width) + matmul(rows, token_dim, width)
  others = (matmul(time_rows, width, width) + matmul(cond_rows, cond_width, width)
            + depth * (matmul(rows, width, 3 * width) + 2 * matmul(rows, width, width))
            + matmul(rows, width, 2 * width) + matmul(rows, width, out_dim or token_dim))
  return data_fed, others


def training(h, tokens: int, token_dim: int, cond_width: int, out_dim: int,
             time_rows: Optional[int] = None) -> int:
  """The head's training FLOPs (forward + backward) on `tokens` tokens x batch_mul draws, the
  condition projected once per token; `time_rows`: rows of the time MLP (default all)."""
  rows = tokens * h.batch_mul
  data_fed, others = head_net(rows, token_dim, cond_width, h.width, h.depth, out_dim,
                              cond_rows=tokens, time_rows=time_rows)
  return 2 * data_fed + 3 * others


def sampling(evals: int, calls: int, token_dim: int, cond_width: int, h,
             out_dim: Optional[int]) -> int:
  """`evals` head-net row evaluations made in `calls` net calls of a sampler: every call
  shares one time t over its rows, which the nets embed once (a scalar t), so the time MLP
  counts once per call, not once per row."""
  return sum(head_net(evals, token_dim, cond_width, h.width, h.depth, out_dim, time_rows=calls))


def ode_evaluations(num_steps: int, solver: str) -> int:
  """Head evaluations per token that the ODE solver needs: Euler (and Euler-Maruyama) 1 per
  step; Heun 2 per step, but only 1 in the last step, which keeps the Euler value."""
  return num_steps if solver in ("euler", "euler_maruyama") else 2 * num_steps - 1
