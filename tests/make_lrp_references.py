"""Writes ``tests/data/lrp_small_cnn.npz``: zennit's LRP relevance of the small CNN of ``tests/lrp_reference.py``.

Run from the repository root in an environment with torch and zennit (the ``peers`` extra)::

    python tests/make_lrp_references.py

The file holds the torch-layout weights (``weight/<key>``), the images [3, 8, 8, 3] and targets [3], and for every
case of ``lrp_reference.CASES`` zennit's relevance ``relevance/<case>`` [3, 8, 8, 3] (float32), plus the zennit and
torch versions. ``tests/test_lrp.py`` recomputes the relevance with saliency_jax and compares, without torch.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lrp_reference  # noqa: E402

OUT = HERE / "data" / "lrp_small_cnn.npz"
WEIGHT_SEED, IMAGE_SEED = 0, 1


def main() -> None:
    from importlib.metadata import version

    from zennit.canonizers import SequentialMergeBatchNorm

    sd = lrp_reference.state_dict(WEIGHT_SEED)
    net = lrp_reference.torch_net(sd)
    images, targets = lrp_reference.images_and_targets(IMAGE_SEED)
    arrays = {f"weight/{k}": v for k, v in sd.items()}
    arrays.update(images=images, targets=targets, zennit_version=np.array(version("zennit")),
                  torch_version=np.array(version("torch")))
    for name, _, rule, rule_kwargs in lrp_reference.CASES:
        relevance = lrp_reference.zennit_relevance(net, images, targets, rule, rule_kwargs, SequentialMergeBatchNorm())
        arrays[f"relevance/{name}"] = relevance.astype(np.float32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {sorted(arrays)}")


if __name__ == "__main__":
    main()
