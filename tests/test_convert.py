"""Importers refuse a mismatched state dict, naming every offending key, and lay kernels out for Flax."""
import numpy as np
import pytest

from arjax.weights import state_dict as state_dict_lib
from arjax.heads.mar_mlp_weights import diffloss_params_from_state_dict

EXPECTED = {
    "fc.weight": (("fc", "kernel"), (3, 2), np.float32),
    "fc.bias": (("fc", "bias"), (3,), np.float32),
    "norm.weight": (("norm", "scale"), (3,), np.float32),
}


def test_matching_state_dict_becomes_a_flax_tree_with_transposed_kernels():
  given = {"fc.weight": np.arange(6.0).reshape(3, 2), "fc.bias": np.ones(3), "norm.weight": np.ones(3)}
  params = state_dict_lib.to_params(given, EXPECTED, what="toy", kernel_layout=lambda w: w.T)
  np.testing.assert_array_equal(params["fc"]["kernel"], given["fc.weight"].T)
  assert set(params) == {"fc", "norm"} and params["norm"]["scale"].dtype == np.float32


def test_every_missing_unexpected_and_misshaped_key_is_named_at_once():
  given = {"fc.weight": np.zeros((2, 3)), "fc.bias": np.zeros(3), "extra.weight": np.zeros(1)}
  with pytest.raises(ValueError) as e:
    state_dict_lib.to_params(given, EXPECTED, what="toy model", kernel_layout=lambda w: w.T,
                             key_prefix="net.")
  message = str(e.value)
  assert message.startswith("toy model:")
  assert "missing: net.norm.weight" in message
  assert "unexpected: net.extra.weight" in message
  assert "mis-shaped: net.fc.weight: got (2, 3), expected (3, 2)" in message


def test_diffloss_importer_rejects_a_foreign_state_dict():
  with pytest.raises(ValueError, match="diffloss.net."):
    diffloss_params_from_state_dict({"diffloss.net.bogus.weight": np.zeros((2, 2))})
