"""Importers: official PyTorch checkpoints (exact state_dict names) -> arjax parameters."""
