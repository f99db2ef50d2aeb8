r"""Speed of Guided Zoom evidence-pool generation (Bargal 2019, Algorithm 1), as ratios measured in one run.

Throughput (training images per second) of Algorithm 1 with cEB and L = 2 erasing rounds (three maps, two erasings,
two re-classifications and three patches per image), three ways, same model, same images, same run:

1. ``batched``: :func:`saliency_jax.evaluation.guided_zoom.evidence_pool` on a whole batch in one jitted call;
2. ``per-image jit``: the same jitted function called once per image (batch of 1), a Python loop over images;
3. ``per-image host``: the released code's structure: per image and round, one jitted cEB map and one jitted
   classification, with the peak, crop, bicubic resize (Pillow) and erasing done on the host in NumPy.

Settings (``--setting``): ``cifar`` = the CIFAR-10 zoom (SmallCNN sees 16 x 16, patches from the 32 x 32 original,
cEB at ``conv2``); ``resnet18`` = ResNet-18 at 112 x 112 (cEB at ``layer3``; patch 38, erase 21, output 64, the
thesis' 150 / 85 of 448 scaled).

Usage:
  python benchmarks/guided_zoom_benchmark.py [--setting cifar,resnet18] [--batch 64] [--repeats 5]

Prints a table; each time is the median over ``--repeats`` timed runs after a warm-up (compile) run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from saliency_jax import models
from saliency_jax.evaluation import guided_zoom as gz
from saliency_jax.saliency import contrastive_excitation_backprop, linen_layer

SETTINGS = {  # name -> (model, image size, original size, cEB layer, patch, erase, output)
    "cifar": ("small_cnn", 16, 32, "conv2", 16, 4, 16),
    "resnet18": ("resnet18", 112, 112, "layer3", 38, 21, 64),
}


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_loop(ceb_one, logits_one, images, originals, labels, *, patch, erase, output, num_erasures=2):
    """Algorithm 1 as the released code runs it: one image at a time, NumPy/Pillow on the host."""
    h, w = images.shape[1:3]
    big = originals.shape[1]
    pool = []
    for b in range(images.shape[0]):
        image = images[b:b + 1].copy()
        for l in range(num_erasures + 1):
            saliency = np.asarray(ceb_one(image, labels[b:b + 1]))[0]
            saliency = np.asarray(Image.fromarray(saliency).resize((w, h), Image.Resampling.BILINEAR))
            r, c = np.unravel_index(np.argmax(saliency), saliency.shape)
            cr, cc = (r + 0.5) * big / h, (c + 0.5) * big / w
            top, left = int(np.floor(cr - patch / 2)), int(np.floor(cc - patch / 2))
            box = originals[b, max(top, 0):top + patch, max(left, 0):left + patch]
            pool.append(np.stack([np.asarray(Image.fromarray(box[..., k]).resize((output, output),
                                                                                 Image.Resampling.BICUBIC))
                                  for k in range(box.shape[2])], -1))
            if l == num_erasures:
                break
            er, ec = int(np.floor(r + 0.5 - erase / 2)), int(np.floor(c + 0.5 - erase / 2))
            image[0, max(er, 0):er + erase, max(ec, 0):ec + erase] = 0.0
            if int(np.argmax(np.asarray(logits_one(image))[0])) != labels[b]:
                break
    return pool


def bench(setting: str, batch: int, repeats: int) -> dict[str, float]:
    name, size, original, layer, patch, erase, output = SETTINGS[setting]
    model = models.get_model(name, 10)
    rng = np.random.default_rng(0)
    originals = rng.uniform(size=(batch, original, original, 3)).astype(np.float32)
    images = np.asarray(jax.image.resize(originals, (batch, size, size, 3), "linear"))
    variables = model.init(jax.random.key(0), jnp.asarray(images[:1]))
    logits_fn = functools.partial(model.apply, variables, train=False)
    labels = np.asarray(jnp.argmax(logits_fn(jnp.asarray(images)), -1)).astype(np.int32)  # all kept at l = 0
    split = linen_layer(model, variables, layer, train=False)
    grounding = gz.contrastive_eb_grounding(split)
    pool_fn = jax.jit(functools.partial(gz.evidence_pool, grounding, logits_fn, patch_size=patch, erase_size=erase,
                                        output_size=output))
    x, xo, y = jnp.asarray(images), jnp.asarray(originals), jnp.asarray(labels)

    t_batched = median_seconds(lambda: pool_fn(x, y, originals=xo).patches, repeats)

    def per_image_jit():
        return [pool_fn(x[i:i + 1], y[i:i + 1], originals=xo[i:i + 1]).patches for i in range(batch)]

    t_jit_loop = median_seconds(per_image_jit, max(2, repeats // 2))

    ceb_one = jax.jit(lambda im, t: contrastive_excitation_backprop(split, im, t).saliency)
    logits_one = jax.jit(logits_fn)
    t_host = median_seconds(lambda: host_loop(ceb_one, logits_one, images, originals, labels, patch=patch,
                                              erase=erase, output=output), max(2, repeats // 2))
    return {"batched img/s": batch / t_batched, "per-image jit img/s": batch / t_jit_loop,
            "per-image host img/s": batch / t_host, "batched / per-image jit": t_jit_loop / t_batched,
            "batched / per-image host": t_host / t_batched}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="cifar,resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  batch {args.batch}  (median of {args.repeats} runs)")
    rows = {s: bench(s, args.batch, args.repeats) for s in args.setting.split(",")}
    cols = list(next(iter(rows.values())))
    print("| setting | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
