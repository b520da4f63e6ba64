"""Test set-up: 8 fake CPU devices so sharding is exercised without accelerators."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Persistent compilation cache: subprocess CLI tests recompile the same programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/tldr-jax-test-xla-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
