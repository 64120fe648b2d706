"""The FID Inception run over a stream: sharded over the batch, padded, streamed; the same
numbers as one direct call of the network, and statistics equal to the in-memory ones."""
import jax
import numpy as np
import pytest

from arjax.evaluation import fid
from arjax.evaluation import inception
from arjax.evaluation import inception_extractor

import inception_testing


@pytest.fixture(scope="module")
def params():
  return inception_testing.random_params()


def test_a_stream_larger_than_a_batch_gives_the_direct_outputs_and_their_statistics(params):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (9, 24, 20, 3), dtype=np.uint8)
  extractor = inception_extractor.InceptionExtractor(params, batch_size=8)  # 8 devices, 1 each
  assert extractor.mesh.devices.size == jax.local_device_count()
  result = extractor.stream([images], keep_pool3=True)  # split 8 + 1 (padded to 8)
  direct = jax.jit(inception.FIDInceptionV3().apply)({"params": params}, images)
  for key in ("pool3", "logits_unbiased"):
    got = getattr(result, key)
    want = np.asarray(direct[key])
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), key
  mu, sigma = result.moments.statistics()
  assert result.moments.count == 9
  np.testing.assert_allclose(mu, result.pool3.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(result.pool3, rowvar=False), rtol=1e-6,
                             atol=1e-9 * np.abs(sigma).max())


def test_one_process_merges_to_itself():
  moments = fid.FeatureMoments.of(np.random.default_rng(0).normal(size=(5, 3)))
  assert inception_extractor.merged_across_processes(moments) is moments


def test_batches_must_divide_over_the_devices(params):
  with pytest.raises(ValueError, match="must be a multiple of the 8 devices"):
    inception_extractor.InceptionExtractor(params, batch_size=12)
