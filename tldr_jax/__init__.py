"""tldr-jax: shrink vision-language training data with JAX.

Two jobs: TL;DR compression (`tldr-jax compress`) and trajectory-matching dataset
distillation (`tldr-jax buffer` / `distill` / `eval-distilled`).
"""

__version__ = "0.1.0"
