"""Tokenizers: images <-> continuous tokens.

The contract (a VAE tokenizer keeps it too):

    tokenizer.encode(images [B, H, W, C] float in [-1, 1]) -> tokens [B, T, D]
    tokenizer.decode(tokens [B, T, D]) -> images [B, H, W, C] float in [-1, 1]
    tokenizer.num_tokens, tokenizer.token_dim
    tokenizer.value_range  (lo, hi) bounding every valid token entry, or None if unbounded

Both are pure jnp functions, so they run inside the jitted train step and sampler.

A stochastic tokenizer (the KL VAE) adds `sample_posterior`; when it is true the train step
calls `encode(images, rng)`. One that can train from a latent cache adds
`encode_moments(moments, rng=None)` and `moments_shape` (see arjax/data/latents.py).

The kinds of tokenizer (`config.tokenizer.name`) are listed in `arjax.registry.TOKENIZERS`;
each is a `arjax.tokenizers.base.TokenizerKind` in its own module.
"""
