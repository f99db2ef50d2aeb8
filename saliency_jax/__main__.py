"""``python -m saliency_jax`` = the ``saliency-jax`` console script."""

from saliency_jax.cli import main

main()
