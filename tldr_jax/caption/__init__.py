"""Caption generation with the KV-cached text decoder: see `tldr_jax.caption.generate`."""
