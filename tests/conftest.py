"""Test defaults: CPU only (the suite never needs an accelerator); 8 fake devices are made in a subprocess where a
test needs them (tests/test_train.py)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
