"""Import ImageNet weights saved in PyTorch (torchvision) naming into our Flax ResNet / VGG16 / AlexNet variables.

No PyTorch is needed: the weights are read from a local ``.safetensors`` file or a NumPy ``.npz`` archive whose
keys are torchvision ``state_dict`` keys. To produce one from a torchvision model (on a machine with torch)::

    from safetensors.torch import save_file
    save_file(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), "resnet50.safetensors")

Layout conversions (torch -> Flax):

* conv weight ``[out, in, kh, kw]`` (OIHW) -> ``kernel [kh, kw, in, out]`` (HWIO);
* linear weight ``[out, in]`` -> ``kernel [in, out]``; VGG's ``classifier.0`` and AlexNet's ``classifier.1`` (our
  ``fc6``) additionally have their input axis permuted from torch's (channels, height, width) flatten order to our
  (height, width, channels);
* BatchNorm ``weight`` -> ``scale``, ``bias`` -> ``bias``, ``running_mean`` -> ``batch_stats/.../mean``,
  ``running_var`` -> ``batch_stats/.../var`` (our BatchNorm uses torchvision's eps 1e-5); ``num_batches_tracked``
  is read and ignored.

Names: ResNet paths map one to one (``layer1/0/downsample/0/kernel`` <- ``layer1.0.downsample.0.weight``); VGG16
``conv{s}_{k}`` <- ``features.{i}`` (i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), ``fc6``/``fc7``/``fc8``
<- ``classifier.0``/``classifier.3``/``classifier.6``; AlexNet ``conv1``..``conv5`` <- ``features.{0,3,6,8,10}``,
``fc6``/``fc7``/``fc8`` <- ``classifier.1``/``classifier.4``/``classifier.6``.

:func:`export_state_dict` is the inverse (our variables -> torchvision keys and layouts), to run the same weights in
PyTorch.

The import is strict: every tensor of the file must be used and every Flax leaf set; otherwise a ValueError lists
the missing keys, unexpected keys and shape mismatches. ``skip_head=True`` keeps our freshly initialised head
(``fc`` / ``fc8``) and ignores the file's, for fine-tuning with a different ``num_classes`` (e.g. FT-ResNet50 on
Stanford Cars, 196 classes).

>>> model = ResNet50(num_classes=196)                                          # doctest: +SKIP
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))     # doctest: +SKIP
>>> variables = load_pretrained("resnet50", "resnet50.safetensors", variables, skip_head=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Callable, Mapping

import flax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "RESNET_ARCHS",
    "load_torch_state_dict",
    "import_resnet",
    "import_vgg16",
    "import_alexnet",
    "load_pretrained",
    "export_state_dict",
]

#: ResNet architectures the importer knows: name -> (block type, blocks per stage).
RESNET_ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

_VGG16_DEPTHS = (2, 2, 3, 3, 3)
_VGG_CLASSIFIER = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
_ALEXNET_MODULES = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                    "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
_MAX_LISTED = 25


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch-named state dict from a ``.safetensors`` file or a NumPy ``.npz`` archive.

    Args:
      path: local file; the format is chosen by its suffix (``.safetensors`` or ``.npz``). ``.npz`` is read with
        ``allow_pickle=False``.

    Returns:
      ``{torch_key: array}``, e.g. ``{"conv1.weight": [64, 3, 7, 7] float32, ...}`` (arrays as stored).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file, if the suffix is not supported or the file is unreadable, corrupt or empty.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
            state_dict = dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError and others on corrupt headers.
            raise ValueError(f"cannot read safetensors weights file {path!r}: {type(e).__name__}: {e}") from e
    elif suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read .npz weights file {path!r}: {type(e).__name__}: {e}") from e
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"cannot read .npz weights file {path!r}: it holds a single array, not an archive")
        try:
            state_dict = {key: np.asarray(archive[key]) for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"cannot read .npz weights file {path!r}: {type(e).__name__}: {e}") from e
        finally:
            archive.close()
    else:
        raise ValueError(f"unsupported weights file {path!r}: expected a .safetensors or .npz file with "
                         "torchvision state_dict keys (convert a .pth with safetensors.torch.save_file)")
    if not state_dict:
        raise ValueError(f"weights file {path!r} contains no tensors")
    return state_dict


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One Flax leaf and the torch tensor it is read from."""

    torch_key: str
    flat_key: tuple[str, ...]  # (collection, *module_path, leaf_name)
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]


def _conv_entry(torch_key, flat_key, shape):
    kh, kw, cin, cout = shape
    return _Entry(torch_key, flat_key, (cout, cin, kh, kw), lambda w: np.transpose(w, (2, 3, 1, 0)))


def _dense_entry(torch_key, flat_key, shape):
    cin, cout = shape
    return _Entry(torch_key, flat_key, (cout, cin), lambda w: np.transpose(w, (1, 0)))


def _identity_entry(torch_key, flat_key, shape):
    return _Entry(torch_key, flat_key, tuple(shape), lambda w: w)


def _leaf_entry(torch_module: str, flat_key: tuple[str, ...], shape: tuple[int, ...]) -> _Entry:
    """Maps a standard Flax leaf (Conv/Dense/BatchNorm) to the torch key of ``torch_module``."""
    collection, leaf = flat_key[0], flat_key[-1]
    where = "/".join(flat_key)
    if collection == "params":
        if leaf == "kernel" and len(shape) == 4:
            return _conv_entry(f"{torch_module}.weight", flat_key, shape)
        if leaf == "kernel" and len(shape) == 2:
            return _dense_entry(f"{torch_module}.weight", flat_key, shape)
        if leaf == "scale":
            return _identity_entry(f"{torch_module}.weight", flat_key, shape)
        if leaf == "bias":
            return _identity_entry(f"{torch_module}.bias", flat_key, shape)
    elif collection == "batch_stats":
        if leaf == "mean":
            return _identity_entry(f"{torch_module}.running_mean", flat_key, shape)
        if leaf == "var":
            return _identity_entry(f"{torch_module}.running_var", flat_key, shape)
    raise ValueError(f"no torchvision counterpart for Flax variable {where!r} with shape {tuple(shape)}")


def _flatten(variables: Any) -> dict[tuple[str, ...], Any]:
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else None
        raise ValueError("variables must be the mapping returned by model.init, with a 'params' collection; got "
                         f"{type(variables).__name__} with keys {keys}")
    return traverse_util.flatten_dict(flax.core.unfreeze(variables))


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _apply_entries(state_dict: Mapping[str, Any], variables: Any, entries: list[_Entry], head_module: str,
                   torch_head_prefix: str, skip_head: bool, model: str) -> Any:
    """Checks ``state_dict`` against ``entries`` strictly and returns the variables with every leaf replaced."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{model}: state_dict must be a mapping from torch keys to arrays, got "
                         f"{type(state_dict).__name__}")
    flat = _flatten(variables)
    covered = {e.flat_key for e in entries}
    unmapped = ["/".join(k) for k in flat if k not in covered]
    if unmapped:
        raise ValueError(f"{model}: Flax variables without a torchvision counterpart: {_describe(unmapped)}")

    if skip_head:
        entries = [e for e in entries if e.flat_key[1] != head_module]
    expected = {e.torch_key: e for e in entries}
    bn_modules = {k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_mean")}

    def ignorable(key: str) -> bool:
        if skip_head and key.startswith(torch_head_prefix):
            return True
        module, _, leaf = key.rpartition(".")
        return leaf == "num_batches_tracked" and module in bn_modules

    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not ignorable(k))
    mismatched = []
    for key, entry in expected.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        if tuple(value.shape) != entry.torch_shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs expected {entry.torch_shape} "
                              f"(for {'/'.join(entry.flat_key)})")
        elif value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            mismatched.append(f"{key}: dtype {value.dtype} is not floating point")
    if missing or unexpected or mismatched:
        parts = [f"{model}: the state dict does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if mismatched:
            parts.append(f"shape/dtype mismatches ({len(mismatched)}): {_describe(mismatched)}")
        if any(k.startswith("module.") for k in unexpected):
            parts.append("hint: keys start with 'module.' (a DataParallel checkpoint); strip that prefix")
        if any(m.startswith(torch_head_prefix) for m in mismatched) and not skip_head:
            parts.append(f"hint: the head ({torch_head_prefix}*) has another num_classes; pass skip_head=True "
                         "to keep the freshly initialised head for fine-tuning")
        raise ValueError("\n  ".join(parts))

    new_flat = dict(flat)
    for key, entry in expected.items():
        old = flat[entry.flat_key]
        value = entry.to_flax(np.asarray(state_dict[key]).astype(np.float32))
        assert value.shape == tuple(old.shape), (key, value.shape, old.shape)  # guaranteed by torch_shape
        new_flat[entry.flat_key] = jnp.asarray(value, dtype=old.dtype)
    out = traverse_util.unflatten_dict(new_flat)
    return flax.core.freeze(out) if isinstance(variables, flax.core.FrozenDict) else out


def import_resnet(state_dict: Mapping[str, Any], variables: Any, *, arch: str, skip_head: bool = False) -> Any:
    """Loads a torchvision ResNet state dict into the variables of our :class:`~saliency_jax.models.resnet.ResNet`.

    Args:
      state_dict: ``{torch_key: array}`` as from :func:`load_torch_state_dict` (``conv1.weight``,
        ``bn1.running_mean``, ``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ``fc.weight``, ...).
      variables: ``{"params": ..., "batch_stats": ...}`` from ``model.init`` of the matching ResNet (any
        ``num_filters``; shapes are taken from these variables).
      arch: one of :data:`RESNET_ARCHS` (``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ...); checked against the
        block structure of ``variables``.
      skip_head: keep our ``fc`` and ignore the file's ``fc.*`` (fine-tuning with another ``num_classes``).

    Returns:
      New variables (same structure, float32 leaves) holding the imported weights; the input is not modified.

    Raises:
      ValueError: unknown ``arch``; variables of another architecture or without ``batch_stats``; any missing key,
        unexpected key, or shape mismatch (all listed).
    """
    entries = _resnet_entries(variables, arch)
    return _apply_entries(state_dict, variables, entries, head_module="fc", torch_head_prefix="fc.",
                          skip_head=skip_head, model=f"import_resnet({arch})")


def _resnet_entries(variables: Any, arch: str) -> list[_Entry]:
    if arch not in RESNET_ARCHS:
        raise ValueError(f"import_resnet: unknown arch {arch!r}; expected one of {sorted(RESNET_ARCHS)}")
    block_kind, stage_sizes = RESNET_ARCHS[arch]
    flat = _flatten(variables)
    if not any(k[0] == "batch_stats" for k in flat):
        raise ValueError("import_resnet: variables have no 'batch_stats' collection; pass the full output of "
                         "model.init (params and batch_stats)")
    params = flax.core.unfreeze(variables)["params"]
    stages = [params.get(f"layer{s}") for s in range(1, 5)]
    if not all(isinstance(stage, Mapping) and "0" in stage for stage in stages):
        raise ValueError(f"import_resnet: variables lack stages layer1..layer4 with blocks '0', '1', ...; they are "
                         f"not a {arch}; top-level modules: {sorted(params)}")
    kind = "bottleneck" if "conv3" in stages[0]["0"] else "basic"
    if kind != block_kind:
        raise ValueError(f"import_resnet: variables use {kind} blocks, {arch} uses {block_kind} blocks")
    for s, (stage, expected_blocks) in enumerate(zip(stages, stage_sizes), start=1):
        if len(stage) != expected_blocks:
            raise ValueError(f"import_resnet: layer{s} has {len(stage)} blocks in variables, {arch} has "
                             f"{expected_blocks}")

    return [_leaf_entry(".".join(key[1:-1]), key, tuple(np.shape(leaf))) for key, leaf in flat.items()]


def import_vgg16(state_dict: Mapping[str, Any], variables: Any, *, skip_head: bool = False) -> Any:
    """Loads a torchvision ``vgg16`` (no BatchNorm) state dict into the variables of our :class:`VGG` (VGG16).

    Args:
      state_dict: ``{torch_key: array}`` with ``features.{0,2,5,...,28}.{weight,bias}`` and
        ``classifier.{0,3,6}.{weight,bias}``.
      variables: ``{"params": ...}`` from ``VGG16(...).init`` (any stage widths; depths must be VGG16's).
      skip_head: keep our ``fc8`` and ignore the file's ``classifier.6.*``.

    Returns:
      New variables with the imported weights. ``classifier.0.weight [4096, C * 7 * 7]`` (torch flattens
      channels-first) becomes ``fc6/kernel [7 * 7 * C, 4096]`` in our (height, width, channels) order.

    Raises:
      ValueError: variables that are not VGG16-shaped; any missing key, unexpected key, or shape mismatch.
    """
    return _apply_entries(state_dict, variables, _vgg16_entries(variables), head_module="fc8",
                          torch_head_prefix="classifier.6.", skip_head=skip_head, model="import_vgg16")


def _vgg16_entries(variables: Any) -> list[_Entry]:
    flat = _flatten(variables)
    params = flax.core.unfreeze(variables)["params"]
    depths = []
    for s in range(1, 6):
        k = 0
        while f"conv{s}_{k + 1}" in params:
            k += 1
        depths.append(k)
    if tuple(depths) != _VGG16_DEPTHS or not all(f"fc{i}" in params for i in (6, 7, 8)):
        raise ValueError(f"import_vgg16: variables are not VGG16-shaped (convs per stage {tuple(depths)}, expected "
                         f"{_VGG16_DEPTHS}, and fc6/fc7/fc8); modules found: {sorted(params)}")

    torch_module = {}
    index = 0
    for s, depth in enumerate(_VGG16_DEPTHS, start=1):
        for k in range(1, depth + 1):
            torch_module[f"conv{s}_{k}"] = f"features.{index}"
            index += 2  # conv, ReLU
        index += 1  # max pool
    torch_module.update(_VGG_CLASSIFIER)

    channels = int(np.shape(params["conv5_3"]["kernel"])[-1])
    entries = []
    for key, leaf in flat.items():
        module = key[1]
        if key[0] != "params" or len(key) != 3 or module not in torch_module:
            raise ValueError(f"import_vgg16: no torchvision counterpart for Flax variable {'/'.join(key)!r}")
        shape = tuple(np.shape(leaf))
        if module == "fc6" and key[-1] == "kernel":
            entries.append(_fc6_entry(torch_module[module], key, shape, channels, "import_vgg16"))
        else:
            entries.append(_leaf_entry(torch_module[module], key, shape))
    return entries


def _fc6_entry(torch_module: str, flat_key: tuple[str, ...], shape: tuple[int, ...], channels: int,
               model: str) -> _Entry:
    """fc6 kernel [h * w * C, out] <- torch ``{torch_module}.weight`` [out, C * h * w] (channels-first flatten)."""
    fan_in, out = shape
    side = int(round((fan_in / channels) ** 0.5)) if fan_in % channels == 0 else 0
    if side < 1 or side * side * channels != fan_in:
        raise ValueError(f"{model}: fc6 kernel {shape} does not take a square pooled map of {channels} "
                         "channels")

    def to_flax(w):
        return np.transpose(w.reshape(out, channels, side, side), (2, 3, 1, 0)).reshape(fan_in, out)

    return _Entry(f"{torch_module}.weight", flat_key, (out, fan_in), to_flax)


def import_alexnet(state_dict: Mapping[str, Any], variables: Any, *, skip_head: bool = False) -> Any:
    """Loads a torchvision ``alexnet`` state dict into the variables of our :class:`AlexNet`.

    Args:
      state_dict: ``{torch_key: array}`` with ``features.{0,3,6,8,10}.{weight,bias}`` and
        ``classifier.{1,4,6}.{weight,bias}``.
      variables: ``{"params": ...}`` from ``AlexNet(...).init`` (any conv/fc widths).
      skip_head: keep our ``fc8`` and ignore the file's ``classifier.6.*``.

    Returns:
      New variables with the imported weights. ``classifier.1.weight [4096, C * 6 * 6]`` (torch flattens
      channels-first) becomes ``fc6/kernel [6 * 6 * C, 4096]`` in our (height, width, channels) order.

    Raises:
      ValueError: variables that are not AlexNet-shaped; any missing key, unexpected key, or shape mismatch.
    """
    return _apply_entries(state_dict, variables, _alexnet_entries(variables), head_module="fc8",
                          torch_head_prefix="classifier.6.", skip_head=skip_head, model="import_alexnet")


def _alexnet_entries(variables: Any) -> list[_Entry]:
    flat = _flatten(variables)
    params = flax.core.unfreeze(variables)["params"]
    if set(params) != set(_ALEXNET_MODULES):
        raise ValueError(f"import_alexnet: variables are not AlexNet-shaped (expected exactly the modules "
                         f"{sorted(_ALEXNET_MODULES)}); modules found: {sorted(params)}")
    channels = int(np.shape(params["conv5"]["kernel"])[-1])
    entries = []
    for key, leaf in flat.items():
        module = key[1]
        if key[0] != "params" or len(key) != 3 or module not in _ALEXNET_MODULES:
            raise ValueError(f"import_alexnet: no torchvision counterpart for Flax variable {'/'.join(key)!r}")
        shape = tuple(np.shape(leaf))
        if module == "fc6" and key[-1] == "kernel":
            entries.append(_fc6_entry(_ALEXNET_MODULES[module], key, shape, channels, "import_alexnet"))
        else:
            entries.append(_leaf_entry(_ALEXNET_MODULES[module], key, shape))
    return entries


def load_pretrained(model_name: str, path: str | os.PathLike, variables: Any, skip_head: bool = False) -> Any:
    """Reads a torchvision-named weights file and imports it into ``variables`` (the one entry point).

    Args:
      model_name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``, ``"resnet152"``, ``"vgg16"``
        or ``"alexnet"`` (case, ``-`` and ``_`` ignored: ``"ResNet-50"`` works).
      path: ``.safetensors`` or ``.npz`` file with torchvision ``state_dict`` keys.
      variables: the variables from ``model.init`` of the matching model.
      skip_head: keep our freshly initialised classifier head (``fc`` / ``fc8``), for fine-tuning with another
        ``num_classes``.

    Returns:
      New variables holding the imported weights.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unknown ``model_name``, unreadable file, or any mismatch between file and model (listed).
    """
    name = str(model_name).lower().replace("-", "").replace("_", "")
    if name not in RESNET_ARCHS and name not in ("vgg16", "alexnet"):
        raise ValueError(f"load_pretrained: unknown model_name {model_name!r}; expected one of "
                         f"{sorted(RESNET_ARCHS) + ['vgg16', 'alexnet']}")
    state_dict = load_torch_state_dict(path)
    try:
        if name == "vgg16":
            return import_vgg16(state_dict, variables, skip_head=skip_head)
        if name == "alexnet":
            return import_alexnet(state_dict, variables, skip_head=skip_head)
        return import_resnet(state_dict, variables, arch=name, skip_head=skip_head)
    except ValueError as e:
        raise ValueError(f"{e}\n  (weights file: {os.fspath(path)!r})") from e


def export_state_dict(model_name: str, variables: Any) -> dict[str, np.ndarray]:
    """The inverse of the import: our variables as a torchvision ``state_dict`` (NumPy float32 arrays).

    Used to run the same weights in PyTorch (``benchmarks/peer_benchmark.py``):
    ``torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in export_state_dict("resnet50", variables)
    .items()}, strict=False)`` (strict=False only because torchvision BatchNorms also hold ``num_batches_tracked``,
    which is not exported). Importing the result with :func:`load_pretrained` / ``import_*`` gives ``variables``
    back exactly (every conversion is a permutation of entries).

    Args:
      model_name: as :func:`load_pretrained` (``"resnet50"``, ``"vgg16"``, ``"alexnet"``, ...).
      variables: the variables of the matching model (``params`` and, for ResNets, ``batch_stats``).

    Returns:
      ``{torch_key: array}`` with torchvision's shapes (conv OIHW, linear [out, in], fc6 input in channels-first
      flatten order).

    Raises:
      ValueError: unknown ``model_name`` or variables of another architecture.
    """
    name = str(model_name).lower().replace("-", "").replace("_", "")
    if name == "vgg16":
        entries = _vgg16_entries(variables)
    elif name == "alexnet":
        entries = _alexnet_entries(variables)
    elif name in RESNET_ARCHS:
        entries = _resnet_entries(variables, name)
    else:
        raise ValueError(f"export_state_dict: unknown model_name {model_name!r}; expected one of "
                         f"{sorted(RESNET_ARCHS) + ['vgg16', 'alexnet']}")
    flat = _flatten(variables)
    state_dict = {}
    for entry in entries:
        # to_flax only moves entries: apply it to the torch positions to find where each Flax entry comes from.
        positions = entry.to_flax(np.arange(int(np.prod(entry.torch_shape))).reshape(entry.torch_shape))
        torch_flat = np.empty(int(np.prod(entry.torch_shape)), np.float32)
        torch_flat[np.ravel(positions)] = np.ravel(np.asarray(flat[entry.flat_key], np.float32))
        state_dict[entry.torch_key] = torch_flat.reshape(entry.torch_shape)
    return state_dict
