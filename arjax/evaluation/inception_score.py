"""Inception Score as torch-fidelity computes it (`metric_isc.py`), what MAR and xAR report.

    IS = exp(E_x KL(p(y|x) || p(y)))   per split, then mean and std over splits

torch-fidelity's defaults, which MAR's call keeps: the logits are the FID Inception's
`logits_unbiased` (pool3 @ fc.weight.T, no bias: the original TF code multiplies by the MatMul
weight only), rows shuffled by `np.random.RandomState(2020).permutation(N)`, 10 splits of rows
[i * N // 10, (i + 1) * N // 10) (uneven when N is not a multiple of 10), float64 throughout,
std with ddof 0. Everything works on logits [N, C]: 50,000 x 1008 float64 is 400 MB, so
callers keep the float32 logits (200 MB) and this casts split by split.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

SPLITS = 10
SHUFFLE_SEED = 2020


def split_scores(logits: np.ndarray, *, splits: int = SPLITS, shuffle: bool = True,
                 seed: int = SHUFFLE_SEED) -> np.ndarray:
  """The IS of each split, float64 [splits]."""
  logits = np.asarray(logits)
  if logits.ndim != 2 or not np.issubdtype(logits.dtype, np.floating):
    raise ValueError(f"logits must be a float [N, classes] array, got {logits.dtype} "
                     f"{logits.shape}")
  n = len(logits)
  if not 1 <= splits <= n:
    raise ValueError(f"splits must lie in [1, N={n}], got {splits}")
  if not np.all(np.isfinite(logits)):
    raise ValueError("logits hold non-finite values")
  order = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
  scores = np.empty(splits)
  for i in range(splits):
    part = logits[order[i * n // splits:(i + 1) * n // splits]].astype(np.float64)
    log_p = part - part.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))  # log_softmax
    p = np.exp(log_p)
    log_q = np.log(p.mean(0, keepdims=True))
    scores[i] = np.exp(np.mean(np.sum(p * (log_p - log_q), axis=1)))
  return scores


def inception_score(logits: np.ndarray, *, splits: int = SPLITS, shuffle: bool = True,
                    seed: int = SHUFFLE_SEED) -> Tuple[float, float]:
  """(mean, std) of the IS over `splits` splits of `logits` [N, classes]."""
  scores = split_scores(logits, splits=splits, shuffle=shuffle, seed=seed)
  return float(np.mean(scores)), float(np.std(scores))
