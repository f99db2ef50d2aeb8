"""Writes tests/data/metric_references.npz: ROAD, infidelity and sensitivity-max from the reference libraries.

Run in an environment with the ``peers`` extra (torch, captum, grad-cam):

    python tests/make_metric_references.py

A small CNN (:class:`saliency_jax.models.SmallCNN`, 3 classes, widths 4/8/8, no BatchNorm) is initialised in JAX and
copied into a PyTorch twin; both see the same 4 images (20 x 20 x 3) and the same maps. Where the references draw
random numbers, the same numbers are fed to both sides instead: ROAD runs without noise (pytorch-grad-cam's
``NoisyLinearImputer`` with ``noise=0``), and Captum's ``perturb_func`` returns the perturbations drawn here with
:func:`saliency_jax.evaluation.infidelity_sensitivity.gaussian_perturbations` / ``uniform_perturbations``. The file
stores the weights, inputs and perturbations with the references' outputs, so tests/test_metric_references.py checks
the JAX metrics without torch.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax.evaluation.infidelity_sensitivity import gaussian_perturbations, uniform_perturbations
from saliency_jax.models import SmallCNN

OUT = pathlib.Path(__file__).parent / "data" / "metric_references.npz"
MODEL = SmallCNN(num_classes=3, widths=(4, 8, 8), use_batchnorm=False)
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's ROAD averages
N_PERTURB = 6


def inputs():
    """Weights, images, maps (distinct values, no ties) and targets, from fixed seeds."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 20, 20, 3)).astype(np.float32)
    params = jax.jit(MODEL.init)(jax.random.key(0), jnp.asarray(images))["params"]
    params = jax.tree.map(lambda p: np.asarray(p) * 3.0, params)  # sharper outputs than the initialiser's
    maps = np.stack([rng.permutation(400).reshape(20, 20) for _ in range(4)]).astype(np.float32) / 399.0
    targets = np.asarray([0, 1, 2, 1], np.int32)
    return params, images, maps, targets


def torch_twin(params):
    import torch

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(c_in, c_out, 3, padding=1)
                                              for c_in, c_out in ((3, 4), (4, 8), (8, 8))])
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            for i, conv in enumerate(self.convs):
                if i > 0:
                    x = torch.nn.functional.max_pool2d(x, 2)
                x = torch.relu(conv(x))
            return self.fc(x.mean(dim=(2, 3)))

    model = Twin()
    with torch.no_grad():
        for i, conv in enumerate(model.convs):
            block = params[f"conv{i + 1}"]["conv"]
            conv.weight.copy_(torch.tensor(np.transpose(block["kernel"], (3, 2, 0, 1))))
            conv.bias.copy_(torch.tensor(block["bias"]))
        model.fc.weight.copy_(torch.tensor(np.asarray(params["fc"]["kernel"]).T))
        model.fc.bias.copy_(torch.tensor(params["fc"]["bias"]))
    return model.eval()


def main():
    import torch
    from captum.attr import InputXGradient, Saliency
    from captum.metrics import infidelity, sensitivity_max
    from pytorch_grad_cam.metrics import road as gc_road
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    params, images, maps, targets = inputs()
    model = torch_twin(params)
    x = torch.tensor(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    jax_logits = np.asarray(MODEL.apply({"params": params}, images))
    np.testing.assert_allclose(model(x).detach().numpy(), jax_logits, atol=1e-5)  # the twins agree
    out = {"images": images, "maps": maps, "targets": targets}
    out.update({"param/" + "/".join(str(k.key) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]})

    # ROAD without noise: the imputer itself (MoRF at 50 %), then the per-percentile scores and their averages.
    imputer = gc_road.NoisyLinearImputer(noise=0.0)
    removed = np.stack([m >= np.percentile(m, 50) for m in maps])
    out["road_removed"] = removed
    out["road_imputed"] = np.stack([imputer(x[i], torch.tensor((~removed[i]).astype(np.float32))).numpy()
                                    for i in range(4)]).transpose(0, 2, 3, 1)

    class Noiseless(gc_road.NoisyLinearImputer):
        def __init__(self, noise=0.0, **kwargs):
            super().__init__(noise=0.0, **kwargs)

    gc_road.NoisyLinearImputer = Noiseless  # the ROAD classes build NoisyLinearImputer() (noise 0.01)
    softmax_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    for name, metric in (("morf", gc_road.ROADMostRelevantFirst), ("lerf", gc_road.ROADLeastRelevantFirst)):
        out[f"road_{name}"] = np.stack([metric(p)(x, maps, softmax_targets, model, return_diff=False)
                                        for p in PERCENTILES], -1)
    out["road_morf_average"] = gc_road.ROADMostRelevantFirstAverage(list(PERCENTILES))(x, maps, softmax_targets, model)
    out["road_lerf_average"] = gc_road.ROADLeastRelevantFirstAverage(list(PERCENTILES))(x, maps, softmax_targets, model)
    out["road_combined"] = gc_road.ROADCombined(list(PERCENTILES))(x, maps, softmax_targets, model)

    # Infidelity: Captum's documented perturbation (N(0, 0.003^2), subtracted), drawn in JAX and fed to Captum.
    noise = np.asarray(gaussian_perturbations(jax.random.key(1), jnp.asarray(images), N_PERTURB))
    out["infidelity_perturbations"] = noise
    expanded = torch.tensor(noise.transpose(1, 0, 4, 2, 3).reshape(4 * N_PERTURB, 3, 20, 20))  # repeat_interleave order
    t = torch.tensor(targets, dtype=torch.int64)
    attributions = InputXGradient(model).attribute(x.clone().requires_grad_(True), target=t).detach()
    out["input_x_gradient"] = attributions.numpy().transpose(0, 2, 3, 1)
    broadcast_maps = torch.tensor(np.repeat(maps[:, None], 3, axis=1))
    for name, attr in (("infidelity", attributions), ("infidelity_maps", broadcast_maps)):
        for normalize in (False, True):
            value = infidelity(model, lambda inp: (expanded, inp - expanded), x, attr, target=t,
                               n_perturb_samples=N_PERTURB, normalize=normalize)
            out[name + ("_normalized" if normalize else "")] = value.numpy()

    # Sensitivity-max: the default perturbation (uniform, radius 0.02, added), drawn in JAX; Saliency (|gradient|).
    shifts = np.asarray(uniform_perturbations(jax.random.key(2), jnp.asarray(images), N_PERTURB))
    out["sensitivity_perturbations"] = shifts
    shifted = torch.tensor(shifts.transpose(1, 0, 4, 2, 3).reshape(4 * N_PERTURB, 3, 20, 20))
    saliency = Saliency(model)

    def explain(inp, target):  # Saliency's default abs=True; contiguous, since Captum views the result
        result = saliency.attribute(inp, target=target)
        return tuple(r.contiguous() for r in result) if isinstance(result, tuple) else result.contiguous()

    out["sensitivity_max"] = sensitivity_max(explain, x.contiguous(), perturb_func=lambda inp: inp + shifted,
                                             target=t, n_perturb_samples=N_PERTURB).numpy()
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: " + ", ".join(sorted(out)))


if __name__ == "__main__":
    main()
