"""The `convert` command: official PyTorch checkpoints -> arjax checkpoints, through the converters
that the registered families and tokenizers supply (`arjax.weights.converter`)."""
