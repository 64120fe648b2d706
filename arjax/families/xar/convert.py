"""xAR's release files -> the xar family: what `python -m arjax convert --kind=xar` uses.

Two kinds of file hold xAR weights:
  * the released `xAR-B.pth`, `xAR-L.pth`, `xAR-H.pth`: one bare state dict (eval.py loads it
    with `load_state_dict(checkpoint)`), which becomes both params and ema_params;
  * a training checkpoint of main_mar.py ({'model', 'model_ema', 'optimizer', 'epoch', 'args'}),
    whose `args.model` (xar_base/large/huge) sets the model size.
The KL-16 VAE is MAR's (`--kind=vae`). The config (default configs/imagenet256_xar_base.py) is
checked against what the weights show, each mismatch naming the config field and the key;
then every key is matched (`arjax.families.xar.weights`: missing, unexpected, mis-shaped and
mis-valued buffers named). Head counts are invisible in the weights: they come from args.model
or the config.
"""
import math
import pathlib
from typing import Mapping

import numpy as np

from arjax.families.xar.weights import backbone_params_from_state_dict
from arjax.weights import converter
from arjax.weights.state_dict import CheckpointError, num_indexed

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[3] / "configs"
                     / "imagenet256_xar_base.py")

# models/xar.py factories: name -> (embed dim, depth, heads), encoder and decoder alike.
XAR_MODELS = {
    "xar_base": (768, 8, 12),
    "xar_large": (1024, 16, 16),
    "xar_huge": (1280, 20, 16),
}


def check_fits_config(state_dict: Mapping[str, np.ndarray], config, tokenizer) -> None:
  """Raises ValueError naming each config field the weights contradict (field, value, what
  the weights say, the key that says it). Keys the file lacks are left to the key match."""
  problems = []
  m = config.model
  shape = lambda k: tuple(np.shape(state_dict[k])) if k in state_dict else None

  def expect(field, configured, found, evidence):
    if found is not None and configured != found:
      problems.append(f"config.{field}={configured!r}, the checkpoint has {found!r} ({evidence})")

  if m.family != "xar":
    problems.append(f"config.model.family={m.family!r}: an xAR checkpoint needs 'xar'")
  z_proj, pos = shape("z_proj.weight"), shape("encoder_pos_embed_learned")
  if z_proj:
    expect("model.width", m.width, z_proj[0], f"z_proj.weight {z_proj}")
  for part in ("encoder", "decoder"):
    expect(f"model.{part}_depth", m[f"{part}_depth"],
           num_indexed(state_dict, f"{part}_blocks."), f"{part}_blocks.<i>.* keys")
  fc1 = shape("encoder_blocks.0.mlp.fc1_g.weight")
  if fc1 and fc1[0] != int(m.width * m.mlp_ratio * 2 / 3.):
    problems.append(f"config.model.mlp_ratio={m.mlp_ratio!r} gives a GEGLU hidden width of "
                    f"{int(m.width * m.mlp_ratio * 2 / 3.)}, the checkpoint has {fc1[0]} "
                    f"(encoder_blocks.0.mlp.fc1_g.weight {fc1})")
  class_emb = shape("class_emb.weight")
  if class_emb:
    expect("data.num_classes", config.data.num_classes, class_emb[0] - 1,
           f"class_emb.weight {class_emb}: classes + the null row")
  if pos and z_proj and (pos[1], z_proj[1]) != (tokenizer.num_tokens, tokenizer.token_dim):
    problems.append(
        f"the config's tokenizer gives {tokenizer.num_tokens} tokens of dim "
        f"{tokenizer.token_dim}, the checkpoint {pos[1]} of dim {z_proj[1]} "
        f"(encoder_pos_embed_learned {pos}, z_proj.weight {z_proj})")
  side = math.isqrt(tokenizer.num_tokens)
  if (m.entity, m.entity_k) != ("cell", side // 2):
    problems.append(f"config.model.entity={m.entity!r}, config.model.entity_k={m.entity_k}: "
                    f"official xAR weights are 4 cells of {side // 2} x {side // 2} tokens "
                    f"(entity='cell', entity_k={side // 2})")
  if problems:
    raise ValueError("the checkpoint does not fit the config (fix these fields, e.g. "
                     "--config.model.width=..., or pick another --config):\n  "
                     + "\n  ".join(problems))


class XarConverter(converter.FamilyConverter):
  """`--kind=xar`: xAR-B/L/H.pth (bare state dicts) or a main_mar.py training checkpoint."""
  name = "xar"
  what = "xAR"
  groups = ("model", "model_ema")
  evidence = "encoder_blocks.0.ada_lin.1.weight"
  default_config = DEFAULT_CONFIG

  def detect(self, ckpt):
    names = converter.parameter_names(ckpt)
    return "time_embed.mlp.0.weight" in names or any(".ada_lin.1." in n for n in names)

  bare_state_dict_note = ("{path} holds one bare state dict (as the released xAR-B/L/H.pth do): "
                           "it becomes both params and ema_params")

  def configure(self, config, ckpt, log):
    config = config.copy_and_resolve_references()
    derived = []
    size = XAR_MODELS.get((ckpt.args or {}).get("model"))
    if size is None:
      log(f"{ckpt.path} names no xar_base/large/huge: the config's sizes are checked against "
          "the weights; attention head counts are taken on trust")
      return config, derived
    m = config.model
    values = {"width": size[0], "encoder_depth": size[1], "decoder_depth": size[1],
              "encoder_heads": size[2], "decoder_heads": size[2]}
    for field, value in values.items():
      if m[field] != value:
        m[field] = value
        derived.append(f"config.model.{field}={value!r} (args.model={ckpt.args['model']!r})")
    return config, derived

  def check(self, state_dict, config, tokenizer):
    check_fits_config(state_dict, config, tokenizer)

  def params(self, state_dict, model):
    return {"backbone": backbone_params_from_state_dict(state_dict, model.backbone)}
