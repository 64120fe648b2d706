"""Datasets: the bundled digits TFDS builder (`digits`) and the grain pipelines (`pipeline`)."""
