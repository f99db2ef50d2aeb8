"""zennit (PyTorch) as the reference of the LRP rules: one small CNN in torch and in Flax linen with the same weights.

Used by ``tests/test_lrp.py`` (live comparisons, skipped without torch / zennit) and by
``tests/make_lrp_references.py`` (writes ``tests/data/lrp_small_cnn.npz`` so CI checks the numbers without torch).

The network: conv 3x3 (6, bias) - ReLU - max pool 2 - conv 3x3 (8, no bias) - BatchNorm (inference; random
statistics, scales of both signs) - ReLU - average pool 2 - flatten - dense 16 - ReLU - dense 5, on 8x8x3 inputs.
torch flattens (channels, height, width), Flax (height, width, channels): the first dense kernel is permuted.

zennit's composite for each case assigns one rule to every ``Linear`` layer (convolutions and dense layers) on top of
``layer_map_base`` (``Pass`` for activations, ``Norm`` for average pooling and sums), with
``SequentialMergeBatchNorm`` (``ResNetCanonizer`` for torchvision ResNets) merging batch norm into the conv before
it; the relevance put on the output is ``logits * one_hot(target)``.
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

#: (name, our lrp() keyword arguments, zennit rule class name, its keyword arguments).
CASES = [
    ("epsilon", dict(rule="epsilon"), "Epsilon", dict(epsilon=1e-6)),
    ("epsilon_0.25", dict(rule="epsilon", epsilon=0.25), "Epsilon", dict(epsilon=0.25)),
    ("zplus", dict(rule="zplus"), "ZPlus", dict()),
    ("alpha2_beta1", dict(rule="alpha_beta", alpha=2.0, beta=1.0), "AlphaBeta", dict(alpha=2.0, beta=1.0)),
    ("alpha1_beta0", dict(rule="alpha_beta", alpha=1.0, beta=0.0), "AlphaBeta", dict(alpha=1.0, beta=0.0)),
]
NUM_CLASSES = 5


class SmallLRPNet(nn.Module):
    """The linen form (inference mode only)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(8, (3, 3), padding="SAME", use_bias=False, name="conv2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(NUM_CLASSES, name="fc2")(x)


def state_dict(seed: int) -> dict[str, np.ndarray]:
    """Random torch-layout weights (``torch.nn.Sequential`` keys) as float32 NumPy arrays."""
    r = np.random.default_rng(seed)

    def normal(*shape, scale=0.5):
        return (r.normal(size=shape) * scale).astype(np.float32)

    return {
        "0.weight": normal(6, 3, 3, 3), "0.bias": normal(6),
        "3.weight": normal(8, 6, 3, 3),
        "4.weight": normal(8), "4.bias": normal(8),  # BN scale of both signs
        "4.running_mean": normal(8, scale=0.3), "4.running_var": r.uniform(0.5, 2.0, 8).astype(np.float32),
        "8.weight": normal(16, 32), "8.bias": normal(16),
        "10.weight": normal(NUM_CLASSES, 16), "10.bias": normal(NUM_CLASSES),
    }


def linen_variables(sd: dict[str, np.ndarray]) -> dict:
    """The same weights for :class:`SmallLRPNet`."""
    return {
        "params": {
            "conv1": {"kernel": sd["0.weight"].transpose(2, 3, 1, 0), "bias": sd["0.bias"]},
            "conv2": {"kernel": sd["3.weight"].transpose(2, 3, 1, 0)},
            "bn": {"scale": sd["4.weight"], "bias": sd["4.bias"]},
            "fc1": {"kernel": sd["8.weight"].reshape(16, 8, 2, 2).transpose(2, 3, 1, 0).reshape(32, 16),
                    "bias": sd["8.bias"]},
            "fc2": {"kernel": sd["10.weight"].T, "bias": sd["10.bias"]},
        },
        "batch_stats": {"bn": {"mean": sd["4.running_mean"], "var": sd["4.running_var"]}},
    }


def torch_net(sd: dict[str, np.ndarray]):
    """The torch form, in eval mode."""
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8, eps=1e-5), torch.nn.ReLU(),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, NUM_CLASSES))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    return net.eval()


def zennit_relevance(net, images: np.ndarray, targets: np.ndarray, rule: str, rule_kwargs: dict,
                     canonizer) -> np.ndarray:
    """zennit's input relevance [batch, height, width, channels] for NHWC ``images`` and int ``targets``."""
    import torch
    from zennit import rules
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.types import Linear

    composite = LayerMapComposite(layer_map_base() + [(Linear, getattr(rules, rule)(**rule_kwargs))],
                                  canonizers=[canonizer])
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).requires_grad_()
    with Gradient(model=net, composite=composite) as attributor:
        logits = net(x)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(targets, np.int64)), logits.shape[-1])
        _, relevance = attributor(x, lambda out: out * one_hot.to(out.dtype))
    return relevance.detach().numpy().transpose(0, 2, 3, 1)


def images_and_targets(seed: int, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.normal(size=(batch, 8, 8, 3)).astype(np.float32), r.integers(0, NUM_CLASSES, batch).astype(np.int32)
