"""The mar_cpu_bench arithmetic in plain PyTorch, to time against arjax on the same machine.

Issue 6 gives reference timings of the official MAR code on a machine of this project's kind
(0.67 s per train step, 1.42 s / 2.52 s to sample), but the official code is not available
offline and the machine kind's speed varies about 2x over time (BENCHMARKS.md). This script
does the same arithmetic as MAR's code path for configs/mar_cpu_bench.py, written here from
MAR's published structure (timm ViT blocks, SimpleMLPAdaLN, MAR's sampling loop with boolean
indexing, DDPM p_sample with forward_with_cfg), so that both frameworks can be timed back to
back. It is a re-implementation for timing, not the official code: numbers it prints are
"PyTorch doing MAR's work", not "the official MAR code".

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch numpy
    /tmp/tvenv/bin/python benchmarks/pytorch_mar_equivalent.py [--repeats=N]

Dims: 64 tokens of dim 16, encoder and decoder 256 wide, 4 + 4 blocks, 8 heads, MLP ratio 4,
buffer 16, 10 classes; head 3 blocks x 256 (learned sigma: 32 outputs), batch_mul 4; train
batch 32, AdamW + grad-norm clip 3.0, mask ratio ~ N(1, 0.25) truncated to [0.7, 1]; sampling
16 images, 16 iterations (cosine schedule), 20 DDPM steps, with and without CFG 3.0 (linear).
"""
import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

L, D, W, DEPTH, HEADS, BUF, CLASSES = 64, 16, 256, 4, 8, 16, 10
HW, HDEPTH, T_TRAIN, T_GEN = 256, 3, 1000, 20


class Block(nn.Module):
  """timm ViT block (qkv_bias, fused attention)."""

  def __init__(self):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(W, eps=1e-6), nn.LayerNorm(W, eps=1e-6)
    self.qkv, self.proj = nn.Linear(W, 3 * W), nn.Linear(W, W)
    self.fc1, self.fc2 = nn.Linear(W, 4 * W), nn.Linear(4 * W, W)

  def forward(self, x):
    b, n, _ = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, W // HEADS).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + self.proj(a.transpose(1, 2).reshape(b, n, W))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class ResBlock(nn.Module):
  def __init__(self):
    super().__init__()
    self.in_ln = nn.LayerNorm(HW, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(HW, HW), nn.SiLU(), nn.Linear(HW, HW))
    self.ada = nn.Sequential(nn.SiLU(), nn.Linear(HW, 3 * HW))

  def forward(self, x, y):
    shift, scale, gate = self.ada(y).chunk(3, dim=-1)
    return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class HeadNet(nn.Module):
  """SimpleMLPAdaLN(16, 256, 32, z 256, 3 blocks)."""

  def __init__(self):
    super().__init__()
    self.time_embed = nn.Sequential(nn.Linear(256, HW), nn.SiLU(), nn.Linear(HW, HW))
    self.cond_embed, self.input_proj = nn.Linear(W, HW), nn.Linear(D, HW)
    self.blocks = nn.ModuleList(ResBlock() for _ in range(HDEPTH))
    self.final_norm = nn.LayerNorm(HW, elementwise_affine=False, eps=1e-6)
    self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(HW, 2 * HW))
    self.final = nn.Linear(HW, 2 * D)

  def forward(self, x, t, c):
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    y = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.cond_embed(c)
    h = self.input_proj(x)
    for block in self.blocks:
      h = block(h, y)
    shift, scale = self.final_ada(y).chunk(2, dim=-1)
    return self.final(modulate(self.final_norm(h), shift, scale))

  def forward_with_cfg(self, x, t, c, cfg):
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half]), t, c)
    eps, rest = out[:, :D], out[:, D:]
    cond, uncond = eps.chunk(2)
    half_eps = uncond + cfg * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def cosine_alphas(steps_kept):
  betas = [min(1 - math.cos((i + 1) / T_TRAIN * 0.99206 * math.pi / 2) ** 2 /
               max(math.cos(i / T_TRAIN * 0.99206 * math.pi / 2) ** 2, 1e-12), 0.999)
           for i in range(T_TRAIN)]
  ac = np.cumprod(1 - np.array(betas))
  kept = np.linspace(0, T_TRAIN - 1, steps_kept).round().astype(int)
  ac_kept = ac[kept]
  prev = np.append(1.0, ac_kept[:-1])
  return kept, torch.tensor(ac_kept, dtype=torch.float32), torch.tensor(prev, dtype=torch.float32)


class Mar(nn.Module):
  def __init__(self):
    super().__init__()
    self.class_emb = nn.Embedding(CLASSES, W)
    self.fake_latent = nn.Parameter(torch.zeros(1, W))
    self.z_proj, self.z_proj_ln = nn.Linear(D, W), nn.LayerNorm(W, eps=1e-6)
    self.enc_pos = nn.Parameter(torch.zeros(1, BUF + L, W))
    self.encoder = nn.ModuleList(Block() for _ in range(DEPTH))
    self.enc_norm = nn.LayerNorm(W, eps=1e-6)
    self.dec_embed = nn.Linear(W, W)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
    self.dec_pos = nn.Parameter(torch.zeros(1, BUF + L, W))
    self.decoder = nn.ModuleList(Block() for _ in range(DEPTH))
    self.dec_norm = nn.LayerNorm(W, eps=1e-6)
    self.diff_pos = nn.Parameter(torch.zeros(1, L, W))
    self.head = HeadNet()

  def encode(self, x, mask, class_embedding):
    b = x.shape[0]
    x = self.z_proj(x)
    x = torch.cat([class_embedding[:, None].expand(b, BUF, W), x], dim=1)
    mask_with_buffer = torch.cat([torch.zeros(b, BUF), mask], dim=1)
    x = self.z_proj_ln(x + self.enc_pos)
    x = x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(b, -1, W)
    for block in self.encoder:
      x = block(x)
    return self.enc_norm(x), mask_with_buffer

  def decode(self, x, mask_with_buffer):
    x = self.dec_embed(x)
    b = x.shape[0]
    padded = self.mask_token.expand(b, BUF + L, W).clone()
    padded[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(-1, W)
    x = padded + self.dec_pos
    for block in self.decoder:
      x = block(x)
    return self.dec_norm(x)[:, BUF:] + self.diff_pos


def train_step(model, opt, x, labels, ac_train):
  b = x.shape[0]
  orders = torch.argsort(torch.rand(b, L), dim=1)
  ratio = float(np.clip(np.random.normal(1.0, 0.25), 0.7, 1.0))
  num_masked = int(np.ceil(L * ratio))
  mask = torch.zeros(b, L)
  mask.scatter_(1, orders[:, :num_masked], 1.0)
  drop = (torch.rand(b) < 0.1).float()[:, None]
  ce = drop * model.fake_latent + (1 - drop) * model.class_emb(labels)
  h, mwb = model.encode(x, mask, ce)
  z = model.decode(h, mwb)
  target = x.reshape(b * L, D).repeat(4, 1)
  z = z.reshape(b * L, W).repeat(4, 1)
  m = mask.reshape(b * L).repeat(4)
  t = torch.randint(0, T_TRAIN, (len(target),))
  noise = torch.randn_like(target)
  a = ac_train[t][:, None]
  x_t = a.sqrt() * target + (1 - a).sqrt() * noise
  out = model.head(x_t, t, z)
  mse = ((out[:, :D] - noise) ** 2).mean(dim=1)
  vb = (out[:, D:] ** 2).mean(dim=1)  # stands in for the VB term: same shapes, elementwise
  loss = ((mse + vb) * m).sum() / m.sum()
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
  opt.step()


@torch.no_grad()
def sample(model, labels, cfg, num_iter=16):
  b = len(labels)
  kept, ac, ac_prev = cosine_alphas(T_GEN)
  tokens, mask = torch.zeros(b, L, D), torch.ones(b, L)
  orders = torch.argsort(torch.rand(b, L), dim=1)
  for step in range(num_iter):
    cur = tokens.clone()
    ce = model.class_emb(labels)
    tk, mk = tokens, mask
    if cfg != 1.0:
      tk, mk = torch.cat([tokens, tokens]), torch.cat([mask, mask])
      ce = torch.cat([ce, model.fake_latent.expand(b, W)])
    h, mwb = model.encode(tk, mk, ce)
    z = model.decode(h, mwb)
    mask_ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = max(1, min(int(mask.sum(dim=-1)[0].item()) - 1, int(np.floor(L * mask_ratio))))
    mask_next = torch.zeros(b, L)
    mask_next.scatter_(1, orders[:, :mask_len], 1.0)
    to_pred = mask.bool() if step == num_iter - 1 else torch.logical_xor(mask.bool(),
                                                                        mask_next.bool())
    mask = mask_next
    if cfg != 1.0:
      to_pred = torch.cat([to_pred, to_pred])
    zp = z[to_pred.nonzero(as_tuple=True)]
    scale = 1 + (cfg - 1) * (L - mask_len) / L
    x = torch.randn(len(zp) // (2 if cfg != 1.0 else 1), D)
    if cfg != 1.0:
      x = torch.cat([x, x])
    for i in reversed(range(T_GEN)):
      t = torch.full((len(x),), int(kept[i]))
      out = (model.head.forward_with_cfg(x, t, zp, scale) if cfg != 1.0
             else model.head(x, t, zp))
      eps, v = out[:, :D], out[:, D:]
      a, ap = ac[i], ac_prev[i]
      x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
      mean = (ap.sqrt() * (1 - a / ap) * x0 + (a / ap).sqrt() * (1 - ap) * x) / (1 - a)
      log_var = v.tanh() * 0.5 - 3.0  # stands in for the learned-range interpolation
      x = mean + (i > 0) * torch.exp(0.5 * log_var) * torch.randn_like(x)
    if cfg != 1.0:
      x, _ = x.chunk(2)
      to_pred, _ = to_pred.chunk(2)
    cur[to_pred.nonzero(as_tuple=True)] = x
    tokens = cur
  return tokens


def timed(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  torch.manual_seed(0)
  np.random.seed(0)
  model = Mar()
  for p in model.parameters():  # non-trivial values (the zero inits would be a special case)
    nn.init.normal_(p, std=0.02)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
  x, labels = torch.randn(32, L, D), torch.arange(32) % CLASSES
  ac_train = cosine_alphas(T_TRAIN)[1]
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  for name, fn in (("train step (batch 32)", lambda: train_step(model, opt, x, labels, ac_train)),
                   ("sample 16 images, no CFG", lambda: sample(model, torch.arange(16) % 10, 1.0)),
                   ("sample 16 images, CFG 3.0", lambda: sample(model, torch.arange(16) % 10, 3.0))):
    median, low, high = timed(fn, args.warmup, args.repeats)
    print(f"{name:28s} median {median:.3f} s  [{low:.3f}, {high:.3f}]  ({args.repeats} calls)")


if __name__ == "__main__":
  main()
