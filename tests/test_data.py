"""Tests of saliency_jax.data: sources, augmentation and grain pipelines.

Fast tests write their own tiny files into tmp_path; the real MNIST / CIFAR-10
copies are only read by tests marked ``slow``.
"""

import gzip
import os
import pathlib
import struct

import numpy as np
import pytest
from PIL import Image

from saliency_jax.data import augment as aug
from saliency_jax.data import pipeline
from saliency_jax.data import sources

SHARED = pathlib.Path("/work/shared/data")


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def write_idx(path, array, magic=None, gz=None, truncate=0):
    """Writes an IDX file with struct (big-endian '>I' header), not numpy."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    payload = header + array.tobytes()
    if truncate:
        payload = payload[:-truncate]
    path = pathlib.Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_mnist_dir(root, split="train", n=5, gz=True, n_labels=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 4), dtype=np.uint8)  # rows != cols
    labels = np.arange(n if n_labels is None else n_labels) % 10
    prefix = {"train": "train", "test": "t10k"}[split]
    ext = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


def id_source(n, num_classes=None, side=2):
    """Source whose image pixels and label both encode the example index."""
    ids = np.arange(n)
    images = np.broadcast_to(
        ids[:, None, None, None].astype(np.uint8), (n, side, side, 1)
    ).copy()
    return sources.ImageSource(
        images=images,
        labels=ids if num_classes is None else ids % num_classes,
        num_classes=n if num_classes is None else num_classes,
        name="ids",
    )


def ids_of(batch):
    return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


# ----------------------------------------------------------------------------
# ImageSource.
# ----------------------------------------------------------------------------


def test_image_source_item_format_and_lazy_conversion():
    images = np.array([[[[0], [255]], [[51], [102]]]], dtype=np.uint8)
    src = sources.ImageSource(images, np.array([1]), num_classes=2, name="toy")
    item = src[0]
    assert item["image"].dtype == np.float32 and item["image"].shape == (2, 2, 1)
    np.testing.assert_allclose(
        item["image"][..., 0], [[0.0, 1.0], [0.2, 0.4]], atol=1e-7
    )
    assert item["label"].dtype == np.int32 and int(item["label"]) == 1
    assert src.images.dtype == np.uint8  # stored compactly
    assert src.class_names == ("0", "1")


@pytest.mark.parametrize(
    "images, labels, num_classes, match",
    [
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, int), 2, "rank 4"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.zeros((2, 1), int), 2, "rank 1"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, int), 2, "2 images but 3"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 2]), 2, r"\[0, 2\)"),
        (np.zeros((2, 4, 4, 1), np.uint8), np.array([-1, 0]), 2, r"\[0, 2\)"),
        (np.full((2, 4, 4, 1), np.nan, np.float32), np.zeros(2, int), 2, "NaN"),
        (np.full((2, 4, 4, 1), 2.0, np.float32), np.zeros(2, int), 2, r"\[0, 1\]"),
    ],
)
def test_image_source_validation(images, labels, num_classes, match):
    with pytest.raises(ValueError, match=match) as info:
        sources.ImageSource(images, labels, num_classes=num_classes, name="bad_src")
    assert "bad_src" in str(info.value)


def test_image_source_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8 or float32"):
        sources.ImageSource(
            np.zeros((1, 2, 2, 1), np.float64), np.zeros(1, int), num_classes=1
        )


def test_image_source_resizes_items():
    src = sources.ImageSource(
        np.full((1, 4, 6, 3), 51, np.uint8), np.zeros(1, int), num_classes=1,
        image_size=3,
    )
    image = src[0]["image"]
    assert image.shape == (3, 3, 3)
    np.testing.assert_allclose(image, 0.2, atol=1e-6)


# ----------------------------------------------------------------------------
# MNIST IDX.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_round_trip(tmp_path, gz, split):
    images, labels = make_mnist_dir(tmp_path, split=split, gz=gz)
    src = sources.load_mnist(tmp_path, split)
    assert len(src) == 5 and src.num_classes == 10
    assert src.images.shape == (5, 3, 4, 1)
    np.testing.assert_array_equal(src.images[..., 0], images)
    np.testing.assert_array_equal(src.labels, labels)
    assert src.labels.dtype == np.int32
    item = src[3]
    np.testing.assert_allclose(item["image"][..., 0], images[3] / 255.0, atol=1e-7)
    assert int(item["label"]) == 3


def test_mnist_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.load_mnist(missing, "train")
    make_mnist_dir(tmp_path)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        sources.load_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        sources.load_mnist(tmp_path, "test")


def test_mnist_bad_split(tmp_path):
    make_mnist_dir(tmp_path)
    with pytest.raises(ValueError, match="split"):
        sources.load_mnist(tmp_path, "validation")


def test_mnist_bad_magic(tmp_path):
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz",
              np.zeros((5, 3, 4)), magic=2049)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz") as info:
        sources.load_mnist(tmp_path, "train")
    assert "magic" in str(info.value)


def test_mnist_truncated(tmp_path):
    make_mnist_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 3, 4)),
              truncate=7)
    with pytest.raises(ValueError, match="Truncated.*train-images-idx3-ubyte"):
        sources.load_mnist(tmp_path, "train")
    # Header itself cut short.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">II", 2051, 5))
    with pytest.raises(ValueError, match="Truncated"):
        sources.load_mnist(tmp_path, "train")


def test_mnist_count_mismatch(tmp_path):
    make_mnist_dir(tmp_path, n=5, n_labels=4)
    with pytest.raises(ValueError, match="5 images.*4 labels"):
        sources.load_mnist(tmp_path, "train")


def test_mnist_corrupt_gzip(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])  # cut gzip stream
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        sources.load_mnist(tmp_path, "train")
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        sources.load_mnist(tmp_path, "train")


# ----------------------------------------------------------------------------
# NumPy archives.
# ----------------------------------------------------------------------------


def _npz_arrays(n_train=6, n_test=4):
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (n_train, 3, 3, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, 3, 3, 3), dtype=np.uint8),
        "y_test": np.array([0, 1, 3, 1])[:n_test],
    }


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays()
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    train = sources.load_npz(path, "train")
    test = sources.load_npz(path, "test")
    # num_classes from max over both splits (label 3 only in test).
    assert train.num_classes == test.num_classes == 4
    np.testing.assert_array_equal(test.images, arrays["x_test"])
    np.testing.assert_array_equal(train.labels, arrays["y_train"])
    np.testing.assert_allclose(
        test[2]["image"], arrays["x_test"][2] / 255.0, atol=1e-7
    )
    assert int(test[2]["label"]) == 3
    named = sources.load_npz(path, "train", class_names=["a", "b", "c", "d"])
    assert named.class_names == ("a", "b", "c", "d")


def test_npz_grayscale_and_stored_class_names(tmp_path):
    path = tmp_path / "gray.npz"
    np.savez(
        path,
        x_train=np.zeros((2, 5, 5), np.uint8), y_train=np.array([0, 1]),
        x_test=np.zeros((1, 5, 5), np.uint8), y_test=np.array([1]),
        class_names=np.array(["zero", "one"]),
    )
    src = sources.load_npz(path, "test")
    assert src.images.shape == (1, 5, 5, 1)
    assert src.class_names == ("zero", "one")


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "partial.npz"
    arrays = _npz_arrays()
    del arrays["y_test"]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="partial.npz") as info:
        sources.load_npz(path, "train")
    message = str(info.value)
    assert "y_test" in message and "x_train" in message  # missing and found


def test_npz_refuses_pickle(tmp_path):
    path = tmp_path / "pickled.npz"
    arrays = _npz_arrays()
    arrays["y_train"] = np.array([{"label": 0}] * 6, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="pickled.npz"):
        sources.load_npz(path, "train")


def test_npz_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        sources.load_npz(tmp_path / "absent.npz", "train")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        sources.load_npz(bad, "train")


def test_get_source_cifar10_dir(tmp_path):
    arrays = _npz_arrays()
    arrays["y_test"] = np.array([9, 0, 1, 2])
    np.savez(tmp_path / "cifar10.npz", **arrays)
    src = sources.get_source("cifar10", "test", str(tmp_path))
    assert src.class_names == sources.CIFAR10_CLASSES
    assert src.class_names[0] == "airplane" and src.class_names[9] == "truck"
    assert src.num_classes == 10 and src.name == "cifar10/test"


# ----------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------


def _make_folder(root):
    colors = {"cat": (255, 0, 51), "dog": (0, 102, 255), "ant": (10, 20, 30)}
    for name, color in colors.items():
        d = root / "train" / name
        d.mkdir(parents=True)
        Image.new("RGB", (6, 5), color).save(d / "a.png")
        Image.new("RGB", (3, 7), color).save(d / "b.PNG")
        (d / "notes.txt").write_text("not an image")
    Image.new("L", (4, 4), 128).save(root / "train" / "ant" / "c.png")  # gray
    return colors


def test_image_folder_labels_and_decoding(tmp_path):
    colors = _make_folder(tmp_path)
    src = sources.load_image_folder(tmp_path, "train", image_size=4)
    assert src.class_names == ("ant", "cat", "dog")  # sorted -> label ids
    assert len(src) == 7
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 2, 2])
    for i in range(len(src)):
        item = src[i]
        assert item["image"].shape == (4, 4, 3) and item["image"].dtype == np.float32
        name = src.class_names[int(item["label"])]
        if pathlib.Path(src.paths[i]).name == "c.png":
            expected = np.full(3, 128 / 255.0)
        else:
            expected = np.array(colors[name]) / 255.0
        # Bilinear resize of a uniform image keeps it uniform.
        np.testing.assert_allclose(item["image"], np.broadcast_to(expected, (4, 4, 3)),
                                   atol=1e-6)


def test_image_folder_corrupt_and_missing(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = sources.load_image_folder(tmp_path, "train", image_size=4)
    index = src.paths.index(str(bad))
    with pytest.raises(ValueError, match="zz_broken.png"):
        src[index]
    with pytest.raises(FileNotFoundError, match="test"):
        sources.load_image_folder(tmp_path, "test", image_size=4)
    with pytest.raises(ValueError, match="image_size"):
        sources.get_source("folder", "train", str(tmp_path))


# ----------------------------------------------------------------------------
# scikit-learn digits.
# ----------------------------------------------------------------------------


def test_digits_split_sizes_stratified_disjoint():
    from sklearn.datasets import load_digits as sk_load_digits

    train = sources.load_digits("train")
    test = sources.load_digits("test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.shape[1:] == (8, 8, 1)
    assert float(train.images.max()) == 1.0 and float(train.images.min()) == 0.0
    # The union of both splits is exactly the original data set (as multisets
    # of (image, label) rows), so the splits are disjoint and covering.
    digits = sk_load_digits()
    original = np.concatenate(
        [digits.images.reshape(-1, 64) / 16.0, digits.target[:, None]], axis=1
    )
    ours = np.concatenate([
        np.concatenate([s.images.reshape(-1, 64), s.labels[:, None]], axis=1)
        for s in (train, test)
    ])
    sort = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_allclose(sort(ours), sort(original), atol=1e-7)
    # Stratified: each class holds 25% of its examples out (+-1).
    total = np.bincount(digits.target, minlength=10)
    held = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(held - 0.25 * total) <= 1.0)
    # Fixed seed: reloading gives the same split.
    np.testing.assert_array_equal(sources.load_digits("test").labels, test.labels)


def test_digits_bad_split():
    with pytest.raises(ValueError, match="split"):
        sources.load_digits("val")


# ----------------------------------------------------------------------------
# get_source and TFDS.
# ----------------------------------------------------------------------------


def test_get_source_dispatch_and_unknown(tmp_path):
    assert sources.get_source("digits", "test").name == "digits/test"
    make_mnist_dir(tmp_path, split="test")
    assert len(sources.get_source("mnist", "test", str(tmp_path))) == 5
    np.savez(tmp_path / "toy.npz", **_npz_arrays())
    assert sources.get_source("npz", "train", str(tmp_path / "toy.npz")).name == "toy/train"
    with pytest.raises(ValueError, match="digits.*mnist.*tfds"):
        sources.get_source("imagenet", "train")
    with pytest.raises(ValueError, match="data_dir"):
        sources.get_source("mnist", "train")


def test_tfds_missing_prepared_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        sources.get_source("tfds:mnist", "train", str(tmp_path))
    # Nothing may be downloaded or written.
    assert not any(tmp_path.rglob("*.array_record*"))


def test_tfds_prepared_array_record(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class SaliencyJaxTinyTestImages(tfds.core.GeneratorBasedBuilder):
        """4x4 RGB images; Tensor feature (encoding Image needs TensorFlow)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6),
                    "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((4, 4, 3), 10 * i, np.uint8), "label": i % 3}

    SaliencyJaxTinyTestImages(
        data_dir=str(tmp_path), file_format="array_record"
    ).download_and_prepare()
    src = sources.get_source(
        "tfds:saliency_jax_tiny_test_images", "train", str(tmp_path)
    )
    assert len(src) == 6 and src.num_classes == 3
    assert src.class_names == ("a", "b", "c")
    for i in range(len(src)):
        item = src[i]
        assert item["image"].dtype == np.float32 and item["image"].shape == (4, 4, 3)
        example_id = int(round(float(item["image"][0, 0, 0]) * 255 / 10))
        assert int(item["label"]) == example_id % 3
        assert int(src.labels[i]) == int(item["label"])
    with pytest.raises(ValueError, match="validation"):
        sources.load_tfds("saliency_jax_tiny_test_images", "validation", tmp_path)


# ----------------------------------------------------------------------------
# Augmentation.
# ----------------------------------------------------------------------------


def _ramp(h=6, w=6, c=3):
    return (np.arange(h * w * c, dtype=np.float32).reshape(h, w, c)
            / (h * w * c - 1))


def test_rotation_zero_is_identity():
    image = _ramp()
    np.testing.assert_array_equal(aug.rotate(image, 0.0), image)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(aug.augment(image, rng, rotation=0.0), image)
    # Everything disabled: identity.
    np.testing.assert_array_equal(aug.augment(image, rng), image)


def test_rotate_90_matches_rot90():
    image = _ramp(5, 5, 2)
    np.testing.assert_allclose(
        aug.rotate(image, 90.0), np.rot90(image, 1, axes=(0, 1)), atol=1e-5
    )
    np.testing.assert_allclose(
        aug.rotate(image, -90.0), np.rot90(image, -1, axes=(0, 1)), atol=1e-5
    )


def test_rotation_range_fills_zero_and_stays_in_range():
    image = np.ones((9, 9, 1), np.float32)
    out = aug.rotate(image, 40.0)
    assert out.shape == image.shape
    assert out[0, 0, 0] == 0.0 and out[4, 4, 0] == pytest.approx(1.0)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_horizontal_flip_exact_and_half_the_time():
    image = _ramp()
    flipped = image[:, ::-1]
    np.testing.assert_array_equal(aug.horizontal_flip(image), flipped)
    rng = np.random.default_rng(0)
    n_flipped = 0
    for _ in range(400):
        out = aug.augment(image, rng, hflip=True)
        if np.array_equal(out, flipped):
            n_flipped += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 160 <= n_flipped <= 240


def test_channel_shift_range_same_for_all_channels():
    image = np.full((3, 3, 3), 0.5, np.float32)
    image[0, 0] = [0.2, 0.5, 0.8]
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(300):
        out = aug.augment(image, rng, channel_shift=30.0)
        delta = out - image
        np.testing.assert_allclose(delta, delta[0, 0, 0], atol=1e-6)
        shifts.append(delta[0, 0, 0] * 255.0)
    shifts = np.array(shifts)
    assert shifts.min() >= -30.0 - 1e-3 and shifts.max() <= 30.0 + 1e-3
    assert shifts.min() < -25.0 and shifts.max() > 25.0  # covers the range
    np.testing.assert_allclose(
        aug.apply_channel_shift(np.full((1, 1, 1), 0.95, np.float32), 30.0), 1.0
    )
    np.testing.assert_allclose(
        aug.apply_channel_shift(np.full((1, 1, 1), 0.05, np.float32), -30.0), 0.0
    )


def test_brightness_range_and_clip():
    image = np.full((2, 2, 3), 0.4, np.float32)
    rng = np.random.default_rng(1)
    factors = np.array([
        aug.augment(image, rng, brightness=(0.5, 1.5))[0, 0, 0] / 0.4
        for _ in range(300)
    ])
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6
    assert factors.min() < 0.55 and factors.max() > 1.45
    np.testing.assert_allclose(
        aug.adjust_brightness(np.full((1, 1, 1), 0.9, np.float32), 1.5), 1.0
    )
    np.testing.assert_allclose(
        aug.adjust_brightness(np.full((1, 1, 1), 0.5, np.float32), 0.5), 0.25
    )


def test_paper_augmentation_deterministic_and_bounded():
    image = _ramp(8, 8, 3)
    out1 = aug.augment(image, np.random.default_rng(7), **aug.PAPER_AUGMENTATION)
    out2 = aug.augment(image, np.random.default_rng(7), **aug.PAPER_AUGMENTATION)
    np.testing.assert_array_equal(out1, out2)
    assert out1.dtype == np.float32 and out1.shape == image.shape
    assert out1.min() >= 0.0 and out1.max() <= 1.0
    with pytest.raises(ValueError, match="brightness"):
        aug.augment(image, np.random.default_rng(0), brightness=(1.5, 0.5))
    with pytest.raises(ValueError, match="height, width, channels"):
        aug.augment(image[..., 0], np.random.default_rng(0))


def test_resize():
    image = np.full((4, 6, 2), 0.3, np.float32)
    out = aug.resize(image, 3)
    assert out.shape == (3, 3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    assert aug.resize(image, (8, 5)).shape == (8, 5, 2)
    # Bilinear upsampling of a 1x2 [0, 1] step gives values in between.
    step = np.array([[[0.0], [1.0]]], np.float32)
    up = aug.resize(step, (1, 4))[0, :, 0]
    assert up[0] == pytest.approx(0.0) and up[-1] == pytest.approx(1.0)
    assert 0.0 < up[1] < up[2] < 1.0


# ----------------------------------------------------------------------------
# Pipeline.
# ----------------------------------------------------------------------------


def test_train_val_split():
    train, val = pipeline.train_val_split(100, 0.25, seed=3)
    assert (len(train), len(val)) == (75, 25)
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])),
                                  np.arange(100))
    train2, val2 = pipeline.train_val_split(100, 0.25, seed=3)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(val, pipeline.train_val_split(100, 0.25, seed=4)[1])
    with pytest.raises(ValueError, match="val_fraction"):
        pipeline.train_val_split(100, 1.0)
    train, val = pipeline.train_val_split(10, 0.0)
    np.testing.assert_array_equal(train, np.arange(10))
    assert val.shape == (0,)
    assert [len(a) for a in pipeline.train_val_split(1797, 0.25)] == [1348, 449]


def test_oversample_counts():
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    out = pipeline.oversample([0, 1, 2, 3, 6], labels, {1: 3, 2: 2})
    np.testing.assert_array_equal(out, [0, 1, 1, 1, 2, 2, 3, 6, 6, 6])
    np.testing.assert_array_equal(
        np.bincount(labels[out], minlength=3), [2, 6, 2]
    )
    with pytest.raises(ValueError, match="factor"):
        pipeline.oversample([0], labels, {0: 0})
    with pytest.raises(ValueError, match="indices"):
        pipeline.oversample([7], labels, {})


def test_train_pipeline_format_determinism_and_subset():
    src = id_source(24)
    indices = np.arange(3, 23, 2)  # 10 examples
    kwargs = dict(batch_size=4, seed=5, augment_kwargs=aug.PAPER_AUGMENTATION)
    batches1 = take(iter(pipeline.make_train_dataset(src, indices, **kwargs)), 6)
    batches2 = take(iter(pipeline.make_train_dataset(src, indices, **kwargs)), 6)
    for b1, b2 in zip(batches1, batches2):
        assert b1["image"].shape == (4, 2, 2, 1) and b1["image"].dtype == np.float32
        assert b1["label"].shape == (4,) and b1["label"].dtype == np.int32
        np.testing.assert_array_equal(b1["image"], b2["image"])
        np.testing.assert_array_equal(b1["label"], b2["label"])
        assert set(b1["label"].tolist()) <= set(indices.tolist())
    other = take(iter(pipeline.make_train_dataset(
        src, indices, **{**kwargs, "seed": 6})), 6)
    assert not all(np.array_equal(a["label"], b["label"])
                   for a, b in zip(batches1, other))


def test_train_pipeline_epochs_are_distinct_permutations():
    src = id_source(24)
    ds = pipeline.make_train_dataset(src, None, batch_size=6, seed=0)
    it = iter(ds)
    epochs = [np.concatenate([ids_of(b) for b in take(it, 4)]) for _ in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(24))
    assert not np.array_equal(epochs[0], np.arange(24))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_train_pipeline_finite_epochs():
    src = id_source(10)
    ds = pipeline.make_train_dataset(src, None, batch_size=4, seed=0, num_epochs=2)
    batches = list(ds)
    assert len(batches) == 5  # 20 examples -> 5 full batches
    counts = np.bincount(np.concatenate([b["label"] for b in batches]),
                         minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 2))
    with pytest.raises(ValueError, match="global batch"):
        pipeline.make_train_dataset(src, None, batch_size=32, seed=0, num_epochs=1)


def test_train_pipeline_sharding_disjoint_covering_and_equal_to_global():
    src = id_source(24)
    common = dict(batch_size=6, seed=1, augment_kwargs=aug.PAPER_AUGMENTATION)
    full = take(iter(pipeline.make_train_dataset(src, None, **common)), 8)
    shards = [
        take(iter(pipeline.make_train_dataset(
            src, None, shard_index=k, shard_count=2, **common)), 8)
        for k in range(2)
    ]
    for step in range(8):
        a, b = shards[0][step], shards[1][step]
        assert a["label"].shape == (3,) and b["label"].shape == (3,)
        assert not set(a["label"]) & set(b["label"])  # disjoint within a step
        union = np.concatenate([a["label"], b["label"]])
        np.testing.assert_array_equal(np.sort(union), np.sort(full[step]["label"]))
        # Same augmented image for the same example as the single-process run.
        images = np.concatenate([a["image"], b["image"]])
        for label, image in zip(union, images):
            row = int(np.flatnonzero(full[step]["label"] == label)[0])
            np.testing.assert_allclose(image, full[step]["image"][row], atol=1e-6)
    # One epoch = 4 global steps: the two shards together cover every example.
    seen = np.concatenate([shards[k][s]["label"] for k in range(2) for s in range(4)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))


def test_train_pipeline_shards_yield_equal_batch_counts():
    src = id_source(23)
    counts = [
        len(list(pipeline.make_train_dataset(
            src, None, batch_size=4, seed=0, shard_index=k, shard_count=2,
            num_epochs=1)))
        for k in range(2)
    ]
    assert counts == [5, 5]  # floor(23 / 4) global batches on every shard


def test_train_pipeline_bad_batch_and_shard():
    src = id_source(8)
    with pytest.raises(ValueError, match="shard_count"):
        pipeline.make_train_dataset(src, None, batch_size=5, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_train_dataset(src, None, batch_size=4, seed=0,
                                    shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="augment_kwargs"):
        pipeline.make_train_dataset(src, None, batch_size=4, seed=0,
                                    augment_kwargs={"zoom": 0.1})
    with pytest.raises(ValueError, match="brightness"):
        pipeline.make_train_dataset(src, None, batch_size=4, seed=0,
                                    augment_kwargs={"brightness": (2.0, 1.0)})
    with pytest.raises(ValueError, match="indices"):
        pipeline.make_train_dataset(src, [0, 8], batch_size=4, seed=0)


def test_train_iterator_state_round_trip():
    src = id_source(20)
    ds = pipeline.make_train_dataset(
        src, None, batch_size=4, seed=2, augment_kwargs=aug.PAPER_AUGMENTATION
    )
    it = iter(ds)
    take(it, 7)  # past the first epoch boundary
    state = it.get_state()
    expected = take(it, 5)
    restored = iter(ds)
    next(restored)  # a different position, then restore
    restored.set_state(state)
    for want, got in zip(expected, take(restored, 5)):
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])


def _per_example_prefetch_stream(src, batch_size, seed, augment_kwargs, shard_index=0, shard_count=1):
    """The training stream as built before 2026-12-07: batched after grain's per-example prefetch."""
    import functools

    import grain

    ds = grain.MapDataset.source(pipeline._Subset(src, np.arange(len(src)))).seed(seed).shuffle().repeat(None)
    ds = ds.map(functools.partial(pipeline._prepare, image_size=None)).random_map(
        functools.partial(pipeline._augment_example, augment_kwargs=augment_kwargs))
    local = batch_size // shard_count
    if shard_count > 1:
        ds = pipeline._ProcessRows(ds, local, shard_index, shard_count)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)).batch(local,
                                                                                               drop_remainder=True)


@pytest.mark.parametrize("shard_index,shard_count", [(0, 1), (1, 2)])
def test_batches_made_before_the_prefetch_are_the_old_batches_and_old_positions_resume(shard_index, shard_count):
    src = id_source(20)
    kwargs = dict(batch_size=4, seed=3, augment_kwargs=aug.PAPER_AUGMENTATION)
    new = pipeline.make_train_dataset(src, None, shard_index=shard_index, shard_count=shard_count, **kwargs)
    old = _per_example_prefetch_stream(src, shard_index=shard_index, shard_count=shard_count, **kwargs)
    old_it, new_it = iter(old), iter(new)
    for want, got in zip(take(old_it, 9), take(new_it, 9)):  # across two epoch boundaries
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])
    # An older checkpoint's position (examples) resumes at the same batch; the new one counts batches.
    old_state = old_it.get_state()
    assert set(old_state) == {"next_index"} and new_it.get_state() == {"next_batch": 9}
    resumed = iter(new)
    resumed.set_state(old_state)
    for want, got in zip(take(old_it, 3), take(resumed, 3)):
        np.testing.assert_array_equal(got["image"], want["image"])
    with pytest.raises(ValueError, match="whole number of batches"):
        resumed.set_state({"next_index": int(old_state["next_index"]) + 1})
    with pytest.raises(ValueError, match="unknown training data-iterator state"):
        resumed.set_state({"position": 3})


def test_train_pipeline_resizes():
    src = id_source(8, side=4)
    batch = next(iter(pipeline.make_train_dataset(
        src, None, batch_size=2, seed=0, image_size=3)))
    assert batch["image"].shape == (2, 3, 3, 1)
    assert pipeline.image_shape(src, 3) == (3, 3, 1)
    assert pipeline.image_shape(src) == (4, 4, 1)
    assert pipeline.num_classes(src) == 8


def test_eval_batches_padding_and_mask():
    src = id_source(12)
    indices = np.array([11, 0, 5, 3, 7, 2, 9, 1, 4, 6])
    batches = pipeline.make_eval_batches(
        src, indices, batch_size=4, pad_to_multiple_of=2
    )
    assert len(batches) == 3
    listed = list(batches)
    assert len(listed) == 3
    for b in listed:
        assert b["image"].shape == (4, 2, 2, 1) and b["label"].shape == (4,)
        assert b["mask"].shape == (4,) and b["label"].dtype == np.int32
    np.testing.assert_array_equal(listed[-1]["mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(listed[0]["mask"], [1, 1, 1, 1])
    np.testing.assert_array_equal(listed[-1]["image"][2:], 0.0)
    real = np.concatenate([b["label"][b["mask"] > 0] for b in listed])
    np.testing.assert_array_equal(real, indices)  # deterministic order
    np.testing.assert_array_equal(ids_of(listed[0]), indices[:4])
    again = list(batches)  # re-iterable, same content
    np.testing.assert_array_equal(again[1]["label"], listed[1]["label"])
    whole = list(pipeline.make_eval_batches(src, batch_size=6))
    assert len(whole) == 2 and whole[1]["mask"].sum() == 6
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pipeline.make_eval_batches(src, batch_size=5, pad_to_multiple_of=2)
    empty = pipeline.make_eval_batches(src, np.zeros(0, int), batch_size=4)
    assert len(empty) == 0 and list(empty) == []


# ----------------------------------------------------------------------------
# Real data (slow).
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist():
    root = SHARED / "mnist"
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST copy absent")
    test = sources.load_mnist(root, "test")
    train = sources.load_mnist(root, "train")
    assert (len(train), len(test)) == (60000, 10000)
    assert test.images.shape == (10000, 28, 28, 1)
    # Published MNIST test-set class counts.
    np.testing.assert_array_equal(
        np.bincount(test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    )
    np.testing.assert_array_equal(test.labels[:5], [7, 2, 1, 0, 4])


@pytest.mark.slow
def test_real_cifar10():
    path = SHARED / "cifar10" / "cifar10.npz"
    if not path.exists():
        pytest.skip("real CIFAR-10 copy absent")
    test = sources.get_source("cifar10", "test", str(path.parent))
    assert len(test) == 10000 and test.images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
    mean = test.images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, [126.025, 123.709, 114.854], atol=0.01)


def test_npz_carries_extra_per_example_arrays_as_fields(tmp_path):
    """Any ``<field>_<split>`` array with one entry per example of the split is a field of the items (a region mask
    for attention guidance / RRR, resized with the image; a per-example number passed through); others are left."""
    rng = np.random.default_rng(0)
    region = np.zeros((5, 4, 4), np.uint8)
    region[:, :2, :2] = 1
    path = tmp_path / "own.npz"
    np.savez(path, x_train=rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8), y_train=np.arange(5) % 2,
             x_test=rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8), y_test=np.array([0, 1, 0]),
             region_train=region, weight_train=np.linspace(0, 1, 5), region_test=region[:2],  # 2 != 3 test examples
             palette=np.zeros((7, 3)))
    train = sources.load_npz(path, "train")
    item = train[3]
    assert sorted(item) == ["image", "label", "region", "weight"]
    np.testing.assert_array_equal(item["region"], region[3].astype(np.float32))
    assert item["region"].dtype == np.float32 and float(item["weight"]) == pytest.approx(0.75)
    assert sorted(sources.load_npz(path, "test")[0]) == ["image", "label"]  # region_test has 2 rows for 3 examples
    resized = sources.load_npz(path, "train", image_size=8)[0]
    assert resized["image"].shape == (8, 8, 1) and resized["region"].shape == (8, 8)
    assert resized["region"][0, 0] == pytest.approx(1.0) and resized["region"][7, 7] == pytest.approx(0.0)
    # Through the public path: get_source and the pipeline's batches carry the field.
    src = sources.get_source("npz", "train", data_dir=str(path))
    batch = next(iter(pipeline.make_eval_batches(src, np.arange(5), batch_size=5)))
    np.testing.assert_array_equal(batch["region"][:5], region.astype(np.float32))
    with pytest.raises(ValueError, match="one entry per example"):
        sources.ImageSource(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), num_classes=2,
                            fields={"region": np.zeros((3, 4, 4))})
    with pytest.raises(ValueError, match="cannot be named 'label'"):
        sources.ImageSource(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), num_classes=2,
                            fields={"label": np.zeros(2)})
