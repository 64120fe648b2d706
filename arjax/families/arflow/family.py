"""ARFlow (autoregressive flow with hybrid linear attention) as a plug-in.

ARFlow ("Autoregressive Flow with Hybrid Linear Attention") trains a flow model on sequences
of N images of one class at decreasing noise levels (`model.py`): full attention inside an
image, gated retention across images (`backbone.py`, `arjax.layers.linear_attention`), so a
noisier image is a causal predecessor of a cleaner one. It samples by feeding every step of
the integration as the next image of the sequence, conditioning each denoising step on the
earlier, noisier steps through the recurrent state (`sampler.py`). There is no per-token head:
configs select `head.name='none'` (`arjax/heads/none.py`).

The sequences are built by the input pipeline: `config.data.group_size` = N consecutive
images of one class per sequence (arjax/data/pipeline.py), so `train.global_batch_size`
counts images and is a multiple of N. Noise levels: N uniform draws sorted descending along
the sequence (`model.sequence_times`).
"""
import functools

from arjax.config.schema import positive
from arjax.errors import ConfigError
from arjax.families import base
from arjax.families.arflow import model as arflow_model
from arjax.families.arflow.backbone import ArflowBackbone
from arjax.families.arflow.model import ArflowModel
from arjax.families.arflow.sampler import SOLVERS, ArflowSampler
from arjax.families.xar.backbone import TIME_FREQUENCIES
from arjax.sampling.base import sampler_settings
from arjax.util.flops import matmul


def forward_flops(config, tokens: int, token_dim: int, rows: int, images: int) -> int:
  """One backbone call on `rows` sequences of `images` images of `tokens` tokens: the
  conditions (time MLP, every block's and the output's adaLN), token_in and out; per block q, k,
  v, the SwiGLU gate and out ([W, W] each), the log-gate [W, H], softmax attention inside each
  image (scores and probs.v against its T keys), the state's read q.S and write K^T V (Dh per
  key), the entering states of the images (training form: [n, n] per sequence and head), and
  the MLP's two matrices."""
  m = config.model
  w, depth, heads = m.width, m.depth, m.num_heads
  head_dim, hidden = w // heads, int(w * m.mlp_ratio)
  n = rows * images * tokens
  conditions = rows * images
  condition = (matmul(conditions, TIME_FREQUENCIES, w) + matmul(conditions, w, w)
               + depth * matmul(conditions, w, 6 * w) + matmul(conditions, w, 2 * w))
  block = (5 * matmul(n, w, w) + matmul(n, w, heads) + 2 * matmul(n, w, tokens)
           + 2 * matmul(n, w, head_dim) + 2 * matmul(n, w, hidden))
  if images > 1:
    block += matmul(rows * images * images, w, head_dim)
  return (matmul(n, token_dim, w) + matmul(n, w, token_dim) + condition + depth * block)


class ArflowFamily(base.Family):
  """`model.family='arflow'`."""
  name = "arflow"
  cond_width_field = "width"
  head_splits = (("width", "num_heads"),)
  schema = {
      **base.TRANSFORMER_SCHEMA,
      # The log-gates are log_sigmoid(.) / gate_normalizer (ARFlow: 16): a slow decay.
      "model.gate_normalizer": ((float, int), positive, "> 0"),
      **base.BLOCK_STACK_SCHEMA,
  }
  # The published SDE sampler besides Euler's ODE.
  sample_schema = {
      "sample.solver": ((str,), lambda v: v in SOLVERS, f"one of {SOLVERS}"),
  }

  def check(self, config) -> None:
    super().check(config)
    if config.head.name != "none":
      raise ConfigError(f"config.head.name={config.head.name!r}: ARFlow's backbone is the whole "
                        "flow model and has no per-token head; use 'none'")
    group, batch = config.data.group_size, config.train.global_batch_size
    if batch % group:
      raise ConfigError(f"config.train.global_batch_size={batch} counts images and must be a "
                        f"multiple of config.data.group_size={group} (images per sequence)")
    if config.model.attention_dropout:
      raise ConfigError(f"config.model.attention_dropout={config.model.attention_dropout}: "
                        "ARFlow's retention has no attention dropout; set it to 0")
    if config.sample.head_step_schedule != "constant":
      raise ConfigError(f"config.sample.head_step_schedule="
                        f"{config.sample.head_step_schedule!r}: an ARFlow image is one unit "
                        "of sample.num_steps steps; use 'constant'")

  def build(self, config, tokenizer, head_net, head):
    if head_net is not None:
      raise ConfigError("ARFlow has no per-token head: config.head.name must be 'none'")
    m = config.model
    backbone = ArflowBackbone(
        num_tokens=tokenizer.num_tokens, token_dim=tokenizer.token_dim, width=m.width,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        num_classes=config.data.num_classes, gate_normalizer=float(m.gate_normalizer),
        dtype=base.compute_dtype(config), scan_layers=m.scan_layers, remat=m.remat,
        dropout=m.dropout)
    model = ArflowModel(backbone)
    loss = functools.partial(arflow_model.flow_loss, model=model,
                             group_size=config.data.group_size, label_drop=m.label_drop)
    return model, loss

  def sampler(self, model, head, tokenizer, config):
    return ArflowSampler(model, head, tokenizer, **sampler_settings(config.sample))

  def flops(self, config, tokenizer, head_kind, mode, batch_size):
    """Matmuls only, the tokenizer's decoder not counted.

    train: one forward over batch_size / N sequences of N images, backward 2x (token_in's
      input is data: 1x).
    sample: num_steps calls on one image (rows doubled under CFG), each against the state.
    decode: one such call (one step of the integration: one image of the sequence)."""
    if mode not in ("train", "sample", "decode"):
      raise ValueError(f"mode={mode!r}: the arflow family counts 'train', 'sample' and 'decode'")
    t, d = tokenizer.num_tokens, tokenizer.token_dim
    if mode == "train":
      group = config.data.group_size
      forward = forward_flops(config, t, d, -(-batch_size // group), group)
      backbone = 3 * forward - matmul(-(-batch_size // group) * group * t, d, config.model.width)
    else:
      rows = batch_size * (2 if config.sample.cfg_scale != 1.0 else 1)
      calls = config.sample.num_steps if mode == "sample" else 1
      backbone = calls * forward_flops(config, t, d, rows, 1)
    return {"backbone": int(backbone), "head": 0, "total": int(backbone)}

  def head_units(self, config, tokenizer):
    """One unit: the whole image, integrated by sample.num_steps network calls."""
    return (tokenizer.num_tokens,)

  def example_rows(self, config):
    """A training example is a sequence of data.group_size images."""
    return config.data.group_size

  def stack_depths(self, config):
    return (("model", "depth"),)

  def describe_line(self, config):
    m = config.model
    return (f"arflow: {config.data.group_size} same-class images per sequence, width "
            f"{m.width} x {m.depth} blocks ({m.num_heads} heads: softmax attention inside an "
            "image, gated retention across images)")

  def report_fields(self, config):
    return {"group_size": config.data.group_size, "solver": config.sample.solver}
