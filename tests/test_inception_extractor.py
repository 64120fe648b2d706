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


@pytest.fixture(scope="module")
def direct(params):
  """(images, outputs, stage outputs) of one direct call of the network on 9 images."""
  images = np.random.default_rng(0).integers(0, 256, (9, 24, 20, 3), dtype=np.uint8)
  model = inception.FIDInceptionV3()
  out, variables = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])
                           )(params, images)
  return images, out, inception.stage_outputs(variables)


def test_a_stream_larger_than_a_batch_gives_the_direct_outputs_and_their_statistics(params,
                                                                                     direct):
  images, direct, _ = direct
  extractor = inception_extractor.InceptionExtractor(params, batch_size=8)  # 8 devices, 1 each
  assert extractor.mesh.devices.size == jax.local_device_count()
  result = extractor.stream([images], keep_pool3=True)  # split 8 + 1 (padded to 8)
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
  spatial = np.asarray(direct["spatial"], np.float64)
  mu_s, sigma_s = result.spatial_moments.statistics()
  assert mu_s.shape == (inception.SPATIAL_DIM,) and result.spatial_moments.count == 9
  scale = np.abs(spatial).max()
  np.testing.assert_allclose(mu_s, spatial.mean(0), rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(sigma_s, np.cov(spatial, rowvar=False), rtol=0,
                             atol=1e-5 * scale ** 2)


def test_the_spatial_features_are_the_first_7_channels_of_mixed_6d_s_1x1_branch(params, direct):
  """ADM's sFID features, `mixed_6/conv:0`[..., :7] of the TF graph: the ReLU'd 1x1 branch of
  Mixed_6d, computed here from Mixed_6c's output with that branch's own parameters, and
  flattened in (H, W, C) order."""
  images, out, stages = direct
  branch = inception.BasicConv2d(192, (1, 1), name="branch1x1").apply(
      {"params": params["Mixed_6d"]["branch1x1"]}, stages["Mixed_6c"])
  n = len(images)
  assert branch.shape == (n, 17, 17, 192)
  want = np.asarray(branch[..., :inception.SPATIAL_CHANNELS]).reshape(n, -1)
  assert out["spatial"].shape == (n, inception.SPATIAL_DIM) == want.shape
  np.testing.assert_allclose(out["spatial"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_one_process_merges_to_itself():
  moments = fid.FeatureMoments.of(np.random.default_rng(0).normal(size=(5, 3)))
  assert inception_extractor.merged_across_processes(moments) is moments


def test_batches_must_divide_over_the_devices(params):
  with pytest.raises(ValueError, match="must be a multiple of the 8 devices"):
    inception_extractor.InceptionExtractor(params, batch_size=12)
