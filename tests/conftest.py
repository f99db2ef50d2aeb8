"""Test defaults: CPU only (the suite never needs an accelerator); 8 fake devices are made in a subprocess where a
test needs them (tests/test_train.py)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache written by surprise (the CLI and the runner turn it on by default; tests of the
# cache pass their own folder).
os.environ.setdefault("SALIENCY_JAX_COMPILATION_CACHE", "off")
