"""The papers' evaluation: FID, sFID, Inception Score and precision/recall of a samples file,
streamed.

    metrics = evaluate_samples("workdir/samples.npz", extractor, reference)
    print(format_report(metrics, paper_row="MAR-B"))

The samples' images are read from the .npz batch by batch (`npz_files.stream_rows`) and go
through the FID Inception (`InceptionExtractor`) once: running pool3 moments for FID (against
the reference mu/sigma; `fid`'s 'symmetric' form, golden-checked against torch-fidelity's
formula, several times faster), running moments of the spatial features for sFID (ADM's: the first
7 channels of Mixed_6d's 17 x 17 map, against the reference file's mu_s/sigma_s, or its
images' when it has images but no mu_s; a mu/sigma-only file gives no sFID), the unbiased
logits for the IS (torch-fidelity: 10 splits), and, when the reference file has images (ADM's
arr_0), the pool3 features of both sets for improved precision/recall (k = 3, ADM). Memory: the moments, 4 KB of logits an image, and pool3 (8 KB
an image) only when precision/recall is computed; never the images.

Multi-host: process p of P reads rows [p N / P, (p + 1) N / P) of the samples; the moments are
merged and the logits and features gathered, so every process ends with the same numbers.

PAPER_ROWS holds the published numbers `format_report` prints beside arjax's: MAR (Li et al.
2024, "Autoregressive Image Generation without Vector Quantization", Table 4, ImageNet
256x256 with CFG, 50,000 samples: FID on torch-fidelity against ADM's reference statistics,
precision/recall with ADM's suite).
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import numpy as np

from arjax.evaluation import fid as fid_lib
from arjax.evaluation import improved_precision_recall
from arjax.evaluation import inception_extractor
from arjax.evaluation import inception_score
from arjax.evaluation import npz_files

PAPER_ROWS: Dict[str, Dict[str, float]] = {
    "MAR-B": {"fid": 2.31, "inception_score": 281.7, "precision": 0.82, "recall": 0.57},
    "MAR-L": {"fid": 1.78, "inception_score": 296.0, "precision": 0.81, "recall": 0.60},
    "MAR-H": {"fid": 1.55, "inception_score": 303.7, "precision": 0.81, "recall": 0.62},
    # xAR (Ren et al. 2025, "Beyond Next-Token"), ImageNet 256x256 with CFG: the FIDs of its
    # abstract and of the official repository's evaluation commands; the other columns are not
    # taken from the paper's table here and print as '-'.
    "xAR-B": {"fid": 1.72},
    "xAR-L": {"fid": 1.28},
    "xAR-H": {"fid": 1.24},
}
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def _gathered(rows: np.ndarray) -> np.ndarray:
  """Every process's rows, in process order (one process: `rows`)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  counts = np.asarray(multihost_utils.process_allgather(np.int64(len(rows))))
  padded = np.zeros((int(counts.max()),) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([block[:n] for block, n in zip(everyone, counts)])


def evaluate_samples(samples_path: str, extractor, reference, *,
                     num_images: Optional[int] = None) -> dict:
  """FID / IS (/ precision / recall) of the images in `samples_path` against `reference`
  (`reference_statistics.ReferenceStatistics`); plain Python numbers."""
  if num_images is None:
    shape, _ = npz_files.array_header(samples_path, "images", "samples")
    num_images = shape[0]
  p, count = jax.process_index(), jax.process_count()
  start, stop = p * num_images // count, (p + 1) * num_images // count
  with_pr = reference.images_shape is not None
  batches = npz_files.stream_rows(samples_path, "images", "samples", extractor.batch_size,
                                  start=start, stop=stop)
  samples = extractor.stream(batches, keep_pool3=with_pr)
  moments = inception_extractor.merged_across_processes(samples.moments)
  spatial = inception_extractor.merged_across_processes(samples.spatial_moments)
  logits = _gathered(samples.logits_unbiased)
  ref_mu, ref_sigma = reference.mu, reference.sigma
  ref_mu_s, ref_sigma_s = reference.mu_s, reference.sigma_s
  ref_pool3 = None
  if with_pr or ref_mu is None:  # reference images: features for P/R (and stats if missing)
    ref = extractor.stream(reference.image_batches(extractor.batch_size), keep_pool3=with_pr)
    ref_pool3 = ref.pool3
    if ref_mu is None:
      ref_mu, ref_sigma = ref.moments.statistics()
    if ref_mu_s is None:
      ref_mu_s, ref_sigma_s = ref.spatial_moments.statistics()
  result = {
      "num_images": int(moments.count),
      "reference": reference.path,
      "fid": fid_lib.frechet_distance_from_statistics(moments.mu, moments.sigma, ref_mu,
                                                      ref_sigma, method="symmetric"),
  }
  if ref_mu_s is not None:  # a mu/sigma-only file (MAR's adm_in256_stats.npz) has no sFID
    result["sfid"] = fid_lib.frechet_distance_from_statistics(
        spatial.mu, spatial.sigma, ref_mu_s, ref_sigma_s, method="symmetric")
  # torch-fidelity's 10 splits; fewer (one image each) for a set smaller than that, a smoke
  # run's, rather than no score.
  splits = min(inception_score.SPLITS, len(logits))
  result["inception_score"], result["inception_score_std"] = inception_score.inception_score(
      logits, splits=splits)
  result["inception_score_splits"] = splits
  if with_pr:
    precision, recall = improved_precision_recall.precision_recall(
        ref_pool3, _gathered(samples.pool3))
    result.update(precision=precision, recall=recall, num_reference_images=len(ref_pool3))
  return result


def format_report(metrics: dict, paper_row: str = "") -> str:
  """A table of the metrics, with the published row beside them when `paper_row` names one."""
  paper = PAPER_ROWS.get(paper_row)
  lines = [f"{'metric':<16}{'arjax':>10}" + (f"{paper_row + ' (paper)':>16}" if paper else ""),
           "-" * (26 + (16 if paper else 0))]
  for name in METRICS:
    if name not in metrics:
      continue
    value = metrics[name]
    text = f"{value:.2f}" if name in ("fid", "sfid", "inception_score") else f"{value:.3f}"
    row = f"{name:<16}{text:>10}"
    if paper:
      row += f"{paper.get(name, '-'):>16}"
    lines.append(row)
  lines.append("")
  lines.append(f"{metrics['num_images']} samples against {metrics['reference']}"
               + (f" ({metrics['num_reference_images']} reference images for precision/recall)"
                  if "num_reference_images" in metrics else
                  "; no reference images in it, so no precision/recall"))
  if "sfid" not in metrics:
    lines.append("no sFID: the reference file has neither spatial statistics (mu_s/sigma_s) "
                 "nor images")
  if paper_row and not paper:
    lines.append(f"(no published numbers for {paper_row!r}; known: {sorted(PAPER_ROWS)})")
  return "\n".join(lines)
