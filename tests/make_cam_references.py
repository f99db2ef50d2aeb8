"""Reference maps of the CAM family, occlusion and several targets per image, from pytorch-grad-cam and Captum.

A tiny CNN (conv-ReLU, max pool, conv-ReLU, max pool, flatten, dense: not a global-average-pooling head, so that
HiResCAM, Grad-CAM and XGrad-CAM differ) is built twice with the same weights: in PyTorch (NCHW) for the reference
libraries and in Flax linen (NHWC) for ours (:func:`linen_model`). The weights are drawn here with NumPy.

Run it (in a venv with torch, torchvision, grad-cam and captum; the ``peers`` extra) to write
``tests/data/cam_references.npz``, which ``tests/test_cam_methods.py`` checks without torch::

    PYTHONPATH=. python tests/make_cam_references.py

pytorch-grad-cam 1.5.7 and Captum 0.9.0 made the stored file. Importing this module needs no torch; only
:func:`torch_references` imports it.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PATH = pathlib.Path(__file__).parent / "data" / "cam_references.npz"
SIZE, CHANNELS, WIDTHS, NUM_CLASSES, BATCH = 12, 3, (4, 6), 5, 3
TARGETS = np.array([[0, 3], [1, 4], [2, 0]], np.int64)  # [batch, k]: two classes per image
#: Captum Occlusion settings: a 5x5 window over all channels, stride 3 (the last window is cut by the border).
OCCLUSION = {"window": (5, 5), "strides": (3, 3), "baseline": 0.5}
#: (our method name, pytorch-grad-cam class name) at one layer; Eigen-CAM gets the sign correction (see tests).
SINGLE = [("grad_cam", "GradCAM"), ("grad_cam_plus_plus", "GradCAMPlusPlus"), ("hirescam", "HiResCAM"),
          ("layer_cam", "LayerCAM"), ("xgrad_cam", "XGradCAM"), ("score_cam", "ScoreCAM"),
          ("eigen_cam", "EigenCAM")]
#: the methods checked with two layers (pytorch-grad-cam's target_layers=[block1, block2]).
MULTI = [("grad_cam", "GradCAM"), ("layer_cam", "LayerCAM"), ("score_cam", "ScoreCAM"), ("eigen_cam", "EigenCAM")]


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The CNN's weights in PyTorch layout (conv OIHW, dense [out, in] over the NCHW flattening)."""
    rng = np.random.default_rng(seed)
    c1, c2 = WIDTHS
    flat = c2 * (SIZE // 4) ** 2
    return {
        "conv1_w": rng.normal(0, 0.5, (c1, CHANNELS, 3, 3)).astype(np.float32),
        "conv1_b": rng.normal(0.1, 0.1, (c1,)).astype(np.float32),
        "conv2_w": rng.normal(0, 0.5, (c2, c1, 3, 3)).astype(np.float32),
        "conv2_b": rng.normal(0.1, 0.1, (c2,)).astype(np.float32),
        "fc_w": rng.normal(0, 0.5, (NUM_CLASSES, flat)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, (NUM_CLASSES,)).astype(np.float32),
    }


def images(seed: int = 1) -> np.ndarray:
    """[batch, height, width, channels] float32 in [0, 1]."""
    return np.random.default_rng(seed).uniform(0, 1, (BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32)


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x))


class TinyCNN(nn.Module):
    """The linen twin of :func:`torch_model`: layers ``block1`` and ``block2`` (each conv + ReLU)."""

    @nn.compact
    def __call__(self, x, train: bool = False):  # no train-mode layers; the flag as the evaluators pass it
        x = nn.max_pool(Block(WIDTHS[0], name="block1")(x), (2, 2), strides=(2, 2))
        x = nn.max_pool(Block(WIDTHS[1], name="block2")(x), (2, 2), strides=(2, 2))
        return nn.Dense(NUM_CLASSES, name="fc")(x.reshape(x.shape[0], -1))


def linen_model(w: dict[str, np.ndarray]) -> tuple[TinyCNN, dict]:
    """The linen CNN and its variables from PyTorch-layout weights (the dense rows permuted from NCHW to NHWC)."""
    c2, side = WIDTHS[1], SIZE // 4
    fc = w["fc_w"].reshape(NUM_CLASSES, c2, side, side).transpose(2, 3, 1, 0).reshape(-1, NUM_CLASSES)
    params = {
        "block1": {"conv": {"kernel": w["conv1_w"].transpose(2, 3, 1, 0), "bias": w["conv1_b"]}},
        "block2": {"conv": {"kernel": w["conv2_w"].transpose(2, 3, 1, 0), "bias": w["conv2_b"]}},
        "fc": {"kernel": np.ascontiguousarray(fc), "bias": w["fc_b"]},
    }
    return TinyCNN(), {"params": jax.tree.map(jnp.asarray, params)}


def torch_model(w: dict[str, np.ndarray]):
    """The PyTorch CNN (eval mode) with the weights ``w``."""
    import torch

    c1, c2 = WIDTHS
    model = torch.nn.Sequential()
    model.add_module("block1", torch.nn.Sequential(torch.nn.Conv2d(CHANNELS, c1, 3, padding=1), torch.nn.ReLU()))
    model.add_module("pool1", torch.nn.MaxPool2d(2))
    model.add_module("block2", torch.nn.Sequential(torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU()))
    model.add_module("pool2", torch.nn.MaxPool2d(2))
    model.add_module("flatten", torch.nn.Flatten())
    model.add_module("fc", torch.nn.Linear(c2 * (SIZE // 4) ** 2, NUM_CLASSES))
    with torch.no_grad():
        model.block1[0].weight.copy_(torch.from_numpy(w["conv1_w"]))
        model.block1[0].bias.copy_(torch.from_numpy(w["conv1_b"]))
        model.block2[0].weight.copy_(torch.from_numpy(w["conv2_w"]))
        model.block2[0].bias.copy_(torch.from_numpy(w["conv2_b"]))
        model.fc.weight.copy_(torch.from_numpy(w["fc_w"]))
        model.fc.bias.copy_(torch.from_numpy(w["fc_b"]))
    return model.eval()


def torch_references(w: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every reference array: ``"logits"`` [batch, classes], ``"<method>"`` / ``"multi_<method>"`` [batch, k, h, w]
    maps of pytorch-grad-cam for each column of :data:`TARGETS`, ``"eigen_projection"`` [batch, h2, w2] (the raw
    first-component projection of ``block2``, its sign LAPACK's), ``"occlusion"`` [batch, k, h, w] and
    ``"occlusion_channels"`` [batch, k, channels, h, w] from Captum."""
    import contextlib
    import io

    import pytorch_grad_cam as pgc
    import torch
    from captum.attr import Occlusion
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_with_sign_correction

    class SignedEigenCAM(pgc.EigenCAM):
        """EigenCAM with pytorch-grad-cam's own sign correction (flip when |min| > |max|)."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    torch.manual_seed(0)
    model = torch_model(w)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        out["logits"] = model(xt).numpy()
    classes = {name: getattr(pgc, name) for _, name in SINGLE}
    classes["EigenCAM"] = SignedEigenCAM
    for prefix, methods, layers in (("", SINGLE, [model.block2]), ("multi_", MULTI, [model.block1, model.block2])):
        for ours, name in methods:
            maps = []
            for j in range(TARGETS.shape[1]):
                with classes[name](model=model, target_layers=layers) as cam, \
                        contextlib.redirect_stderr(io.StringIO()):  # ScoreCAM's progress bars
                    maps.append(cam(input_tensor=xt, targets=[ClassifierOutputTarget(int(c)) for c in TARGETS[:, j]]))
            out[prefix + ours] = np.stack(maps, axis=1).astype(np.float32)
    with torch.no_grad():
        acts = model.block2(model.pool1(model.block1(xt))).numpy()
    out["eigen_projection"] = get_2d_projection(acts)
    occ = Occlusion(model)
    attributions = [occ.attribute(xt, sliding_window_shapes=(CHANNELS, *OCCLUSION["window"]),
                                  strides=(CHANNELS, *OCCLUSION["strides"]), baselines=OCCLUSION["baseline"],
                                  target=torch.from_numpy(TARGETS[:, j])).detach().numpy()
                    for j in range(TARGETS.shape[1])]
    out["occlusion_channels"] = np.stack(attributions, axis=1).astype(np.float32)
    out["occlusion"] = out["occlusion_channels"][:, :, 0]
    return out


def main() -> None:
    w, x = weights(), images()
    refs = torch_references(w, x)
    PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PATH, images=x, targets=TARGETS, **{f"w_{k}": v for k, v in w.items()},
                        **{k: v for k, v in refs.items() if k != "occlusion_channels"})
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes): {sorted(refs)}")


if __name__ == "__main__":
    main()
