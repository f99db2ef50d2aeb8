r"""How much Guided Zoom's pool cEB maps change when batch norm is folded (``guided_zoom.ceb_batch_norm``).

Trains the conventional CNN of ``experiments/configs/guided_zoom_cifar10.py`` (SmallCNN with batch norm, CIFAR-10
seen at 16 x 16; ``--steps`` of the config's schedule, the run resumed from ``--workdir`` if it is there) and, on
``--examples`` training images, computes the pool's cEB maps of the ground-truth class at the config's cEB layer
three ways:

* ``fold``: on :func:`saliency_jax.saliency.fold_batch_norm`'s variables (the evaluator's default);
* ``pass``: on the variables as trained (batch norm passes the signal);
* ``flip``: the authors' released pool generator restated (``caffe/evidence_pool_generation.py``): the conv
  channels whose batch-norm scale is negative negated, the scale made positive, mean and shift left as they are.

Prints the batch-norm scales that are negative per layer, and for ``pass`` and ``flip`` against ``fold``: the
relative L1 of the maps (``sum |m - m_fold| / sum |m_fold|``), the fraction of images whose map peak (what a pool
patch is cut around) moves, and the fraction of predictions that differ from the trained network's.

Usage:
  python experiments/batch_norm_fold.py --data /work/shared/data/cifar10/cifar10.npz --workdir /tmp/bn_fold \
      [--steps 2000] [--examples 2000]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments" / "configs"))

import guided_zoom_cifar10  # noqa: E402

from saliency_jax import data as data_lib  # noqa: E402
from saliency_jax import train as train_lib  # noqa: E402
from saliency_jax.data import inputs  # noqa: E402
from saliency_jax.evaluation import guided_zoom as gz  # noqa: E402
from saliency_jax.evaluators import ExperimentData  # noqa: E402
from saliency_jax.evaluators import guided_zoom as gze  # noqa: E402
from saliency_jax.evaluators.base import linen_module  # noqa: E402
from saliency_jax.saliency import contrastive_excitation_backprop, fold_batch_norm, linen_layer  # noqa: E402
from saliency_jax.saliency.excitation_backprop import _batch_norm_pairs  # noqa: E402


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def authors_flip(module, variables, images):
    """The released pool generator's sign correction: conv channels with a negative batch-norm scale negated, the
    scale replaced by its absolute value; batch-norm mean, variance and shift unchanged."""
    out = jax.tree.map(np.array, jax.device_get(variables))
    for linear, norm, *_ in _batch_norm_pairs(module, variables, (images,), {"train": False}):
        bn = _node(out["params"], norm)
        negative = bn["scale"] < 0
        _node(out["params"], linear)["kernel"][..., negative] *= -1
        bn["scale"] = np.abs(bn["scale"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))
    parser.add_argument("--workdir", default="/tmp/bn_fold")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()

    config = guided_zoom_cifar10.get_config()
    config.dataset.data_dir = args.data
    config.num_steps = args.steps
    config.optimizer.lr_boundaries = [int(args.steps * 0.8)]  # the config's x0.1 at 80 % of training
    config.evaluators = ()
    run = train_lib.train(config, args.workdir, progress=False)
    module = linen_module(run, "batch_norm_fold")
    layer = config.guided_zoom.ceb_layer
    example = jnp.zeros((1, *run.image_shape), jnp.float32)
    variants = {"fold": fold_batch_norm(module, run.variables, example, train=False),
                "pass": run.variables,
                "flip": authors_flip(module, run.variables, example)}

    print(f"steps {args.steps}; cEB layer {layer!r}; negative batch-norm scales per layer:")
    for linear, norm, *_ in _batch_norm_pairs(module, run.variables, (example,), {"train": False}):
        gamma = np.asarray(_node(run.variables["params"], norm)["scale"])
        print(f"  {'/'.join(norm)}: {int(np.sum(gamma < 0))} of {gamma.size} (min {gamma.min():+.3f})")

    train_native = gze.native_source(ExperimentData(config), config, "train")
    _, train_idx, _, _ = inputs.load_sources(config)
    idx = np.sort(np.random.default_rng(0).choice(np.asarray(train_idx), args.examples, replace=False))
    apply = jax.jit(functools.partial(module.apply, train=False))
    ceb = {name: jax.jit(lambda x, y, v=v: contrastive_excitation_backprop(linen_layer(module, v, layer, train=False),
                                                                         x, y).saliency)
           for name, v in variants.items()}
    maps = {name: [] for name in variants}
    preds = {name: [] for name in variants}
    for batch in data_lib.make_eval_batches(train_native, idx, batch_size=args.batch):
        keep = np.asarray(batch["mask"]).astype(bool)
        images = jnp.asarray(gze.conventional_images(np.asarray(batch["image"], np.float32),
                                                     config.dataset.image_size))
        labels = jnp.asarray(batch["label"], jnp.int32)
        for name, v in variants.items():
            maps[name].append(np.asarray(ceb[name](images, labels))[keep])
            preds[name].append(np.asarray(jnp.argmax(apply(v, images), -1))[keep])
    maps = {k: np.concatenate(v).astype(np.float64) for k, v in maps.items()}
    preds = {k: np.concatenate(v) for k, v in preds.items()}
    size = tuple(run.image_shape[:2])
    peaks = {k: np.asarray(gz.peak_locations(jnp.asarray(v, jnp.float32), size)) for k, v in maps.items()}
    print(f"{len(idx)} training images, maps {maps['fold'].shape[1:]} (relative to fold):")
    for name in ("pass", "flip"):
        rel = np.abs(maps[name] - maps["fold"]).sum() / np.abs(maps["fold"]).sum()
        moved = np.mean(np.any(peaks[name] != peaks["fold"], axis=-1))
        changed = np.mean(preds[name] != preds["pass"])
        print(f"  {name}: relative L1 {rel:.2e}; peaks moved {moved:.4f}; predictions differing from the trained "
              f"network's {changed:.4f}")


if __name__ == "__main__":
    main()
