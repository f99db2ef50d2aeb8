"""Excitation Dropout train step vs Standard Dropout train step on CNN-2 (Bargal 2019, Table 5.4), same run.

Both steps are ``saliency_jax.train.make_train_step`` with the ``dropout`` training scheme at ``relu_fc1``
(SGD momentum 0.9, batch 100 of 32x32x3 images, 10 classes), jitted once and timed alternately so that load on the
machine hits both alike. Prints the median seconds per step and the ratio ED / SD (target <= 1.10; the thesis's
Caffe layer: 1.23).

  python benchmarks/excitation_dropout_benchmark.py [--iters 10] [--narrow]

``--narrow`` times a narrowed CNN-2 (32/32/64 filters, 256-unit fc layers).

Measured on 2 otherwise idle CPU cores (--iters 10): full CNN-2 0.867 vs 0.892 s/step, ratio 1.03. (Under heavy
load from other jobs the same run gave 1.12: alternate timing does not remove all of the noise.)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saliency_jax.models import CNN2
from saliency_jax.train import init_state, make_train_step
from saliency_jax.training import DropoutConfig, dropout_scheme


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--narrow", action="store_true")
    args = parser.parse_args()
    kwargs = {"conv_features": (32, 32, 64), "fc_features": (256, 256)} if args.narrow else {}
    model = CNN2(num_classes=10, **kwargs)
    tx = optax.sgd(1e-3, momentum=0.9)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((args.batch, 32, 32, 3), np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
    key = jax.random.key(0)
    steps, states = {}, {}
    for scheme in ("standard", "excitation"):
        steps[scheme] = jax.jit(make_train_step(model, tx, dropout_scheme(DropoutConfig(scheme=scheme,
                                                                                          layer="relu_fc1"))))
        states[scheme] = init_state(model, tx, (32, 32, 3), seed=0)
        t0 = time.perf_counter()
        states[scheme], m = steps[scheme](states[scheme], batch, key)
        jax.block_until_ready(m)
        print(f"{scheme}: compile + first step {time.perf_counter() - t0:.1f} s")
    times = {s: [] for s in steps}
    for _ in range(args.iters):
        for scheme in steps:
            t0 = time.perf_counter()
            states[scheme], m = steps[scheme](states[scheme], batch, key)
            jax.block_until_ready(m)
            times[scheme].append(time.perf_counter() - t0)
    sd, ed = np.median(times["standard"]), np.median(times["excitation"])
    print(f"CNN-2{' (narrow)' if args.narrow else ''}, batch {args.batch}, {jax.devices()[0].platform}, "
          f"{args.iters} timed steps each")
    print(f"standard dropout  : {sd:.4f} s/step (median)")
    print(f"excitation dropout: {ed:.4f} s/step (median)")
    print(f"ratio ED / SD     : {ed / sd:.3f}  (target <= 1.10; thesis Table 5.4: 1.23)")


if __name__ == "__main__":
    main()
