"""Per-token heads: model p(x_token | z), give a training loss and a sampler.

The contract every head keeps (so backbones and decoders never special-case one):

    head.loss(net_fn, x [N, D], z [N, W], rng) -> per-token loss [N]
    head.sample(net_fn, z [N, W] (or [2N, W] with CFG), rng, cfg_scale, temperature, steps) -> x [N, D]

`net_fn(x_t, t, z)` is the head network applied with its parameters bound,
a pure function: heads hold configuration, never parameters. t is [N] in `loss` (one time per
row); `sample` passes a scalar, the one time of that solver step shared by every row, so that
the network embeds it once rather than once per row. z is [N, W], or [N/k, W] when k
consecutive rows of x_t share a condition (`loss` passes one z per token for its batch_mul
draws; the nets project it once, `condition.shared_condition`). `sample`'s `rng` is one key or
one key per row [N] (`noise.py`): per-row keys make each row's draws its own.
"""
from arjax.heads.diffusion import MarDiffusion
from arjax.heads.flow import FlowHeadNet, FlowMatching
from arjax.heads.mar_mlp import MarMLPAdaLN

__all__ = ["FlowHeadNet", "FlowMatching", "MarDiffusion", "MarMLPAdaLN"]
