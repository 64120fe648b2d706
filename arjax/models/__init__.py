"""Models: backbones that turn token sequences into per-position conditions z, and heads."""
