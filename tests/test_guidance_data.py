"""Data for attention guidance: Decoy MNIST, CelebA on a generated tree, region templates, regions moving with the
image under augmentation. Fast tests write their own tiny files into tmp_path; the real MNIST is read only by a
test marked ``slow``."""

import gzip
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from saliency_jax.data import augment as aug
from saliency_jax.data import celeba, decoy_mnist, pipeline, regions, sources
from saliency_jax.models import SmallCNN
from saliency_jax.saliency import linen_layer
from saliency_jax.training import attention_guidance as ag

SHARED_MNIST = pathlib.Path("/work/shared/data/mnist")


# ----------------------------------------------------------------------------------------------------------------
# Decoy MNIST.


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def make_mnist(root, n=60, ink_in_corner=True):
    """Fake 28 x 28 MNIST: ink in the centre; image 0 also has ink in every corner (overwritten by the patch)."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = rng.integers(0, 256, size=(n, 16, 12)) * (rng.random((n, 16, 12)) < 0.4)
    if ink_in_corner:
        images[0, :, :] = np.maximum(images[0], 7)
    labels = np.arange(n) % 10
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_patch_value_hand_values():
    np.testing.assert_array_equal(decoy_mnist.patch_value(np.arange(10)),
                                  [255, 230, 205, 180, 155, 130, 105, 80, 55, 30])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        decoy_mnist.patch_value(np.array([10]))


def test_patch_masks_corners():
    masks = decoy_mnist.patch_masks(np.array([0, 1, 2, 3]), 6, 7)
    expected = np.zeros((4, 6, 7), bool)
    expected[0, :4, :4] = expected[1, :4, -4:] = expected[2, -4:, :4] = expected[3, -4:, -4:] = True
    np.testing.assert_array_equal(masks, expected)


@pytest.mark.parametrize("split", ["train", "test"])
def test_decoy_mnist_patches_follow_the_rules(tmp_path, split):
    images, labels = make_mnist(tmp_path)
    src = decoy_mnist.load_decoy_mnist(tmp_path, split, seed=3)
    assert len(src) == 60 and src.num_classes == 10 and src.name == f"decoy_mnist/{split}"
    for i in range(len(src)):
        item = src[i]
        assert set(item) == {"image", "label", "region", "wrong_region", "decoy_label"}
        assert item["image"].shape == (28, 28, 1) and item["image"].dtype == np.float32
        assert item["region"].dtype == np.float32 and item["wrong_region"].dtype == np.float32
        a = item["wrong_region"]
        assert a.sum() == 16 and set(np.unique(a)) == {0.0, 1.0}
        rows, cols = np.nonzero(a)
        assert rows.min() in (0, 24) and rows.max() == rows.min() + 3
        assert cols.min() in (0, 24) and cols.max() == cols.min() + 3
        assert int(item["label"]) == labels[i]
        d = int(item["decoy_label"])
        if split == "train":
            assert d == labels[i]
        pixels = np.rint(item["image"][..., 0] * 255).astype(int)
        np.testing.assert_array_equal(pixels[a > 0], 255 - 25 * d)
        np.testing.assert_array_equal(pixels[a == 0], images[i][a == 0])  # the rest untouched
        # S: the digit's own pixels, never the patch.
        np.testing.assert_array_equal(item["region"], (images[i] > 0) & (a == 0))
    first = src[0]  # image 0 had ink everywhere, under its patch too
    assert first["region"][first["wrong_region"] > 0].sum() == 0 and first["region"].sum() == 28 * 28 - 16


def test_decoy_mnist_deterministic_per_seed(tmp_path):
    make_mnist(tmp_path)
    a = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=0)
    b = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=0)
    c = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.corners, b.corners)
    np.testing.assert_array_equal(a.patch_digits, b.patch_digits)
    assert not np.array_equal(a.corners, c.corners)


def _rrr_draw_order(train_labels, num_test, seed):
    """dtak/rrr's Decoy MNIST draws, restated from reading ``rrr/decoy_mnist.py`` (``_generate_dataset``, ``augment``,
    ``Bern``): NumPy's global stream (here seeded); per training image in order, Bern(0.5) for "rows 0..3" (else the
    last four rows) then Bern(0.5) for "columns 0..3"; then per test image in order a digit chosen from
    ``list(set(train_labels))`` followed by the same two Bernoulli draws. Returns [(digit or None, top, left)]."""
    np.random.seed(seed)
    draws = []
    for _ in train_labels:
        top = np.random.rand() < 0.5
        left = np.random.rand() < 0.5
        draws.append((None, top, left))
    pool = list(set(int(y) for y in train_labels))
    for _ in range(num_test):
        digit = pool[np.random.randint(len(pool))]
        top = np.random.rand() < 0.5
        left = np.random.rand() < 0.5
        draws.append((digit, top, left))
    return draws


def _rrr_image(image, digit, top, left):
    out = image.copy()
    rows = [0, 1, 2, 3] if top else [-1, -2, -3, -4]
    cols = [0, 1, 2, 3] if left else [-1, -2, -3, -4]
    for r in rows:
        for c in cols:
            out[r, c] = 255 - 25 * digit
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_decoy_mnist_follows_rrr_draw_order(tmp_path, seed):
    """A seed gives dtak/rrr's data: both splits equal their generator run after ``np.random.seed(seed)``."""
    images, labels = make_mnist(tmp_path, n=30)
    state = np.random.get_state()
    try:
        draws = _rrr_draw_order(labels, len(labels), seed)  # the fixture's test split = its training split
    finally:
        np.random.set_state(state)
    train = decoy_mnist.load_decoy_mnist(tmp_path, "train", seed=seed)
    test = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=seed)
    n = len(labels)
    for i in range(n):
        _, top, left = draws[i]
        np.testing.assert_array_equal(train.images[i, ..., 0], _rrr_image(images[i], labels[i], top, left))
        digit, top, left = draws[n + i]
        assert test.patch_digits[i] == digit
        np.testing.assert_array_equal(test.images[i, ..., 0], _rrr_image(images[i], digit, top, left))


def test_clean_variant_has_the_same_fields(tmp_path):
    images, _ = make_mnist(tmp_path, ink_in_corner=False)
    decoy = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=2)
    clean = decoy_mnist.load_decoy_mnist(tmp_path, "test", seed=2, decoy=False)
    assert clean.name == "clean_mnist/test"
    np.testing.assert_array_equal(clean.images[..., 0], images)
    for i in range(5):
        c, d = clean[i], decoy[i]
        assert set(c) == set(d)
        for key in ("region", "wrong_region", "decoy_label", "label"):
            np.testing.assert_array_equal(c[key], d[key])


def test_draw_decoys_distribution():
    labels = np.arange(20000) % 10
    train_corners, digits, corners = decoy_mnist.draw_decoys(labels, 20000, seed=0)
    assert abs(np.mean(digits == labels) - 0.1) < 0.01  # independent of the label
    np.testing.assert_allclose(np.bincount(digits, minlength=10) / 20000, 0.1, atol=0.01)
    for c in (corners, train_corners):
        np.testing.assert_allclose(np.bincount(c, minlength=4) / 20000, 0.25, atol=0.015)
    # The training draws come first and do not depend on the test split.
    np.testing.assert_array_equal(decoy_mnist.draw_decoys(labels, 0, seed=0).train_corners, train_corners)
    only = decoy_mnist.draw_decoys(np.array([3, 3, 5]), 500, seed=1).test_digits
    assert set(np.unique(only)) == {3, 5}  # chosen among the training labels
    with pytest.raises(ValueError, match="num_test"):
        decoy_mnist.draw_decoys(labels, -1, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        decoy_mnist.draw_decoys(np.array([10]), 1, seed=0)


def test_decoy_mnist_region_dilation_and_resize(tmp_path):
    make_mnist(tmp_path, ink_in_corner=False)
    exact = decoy_mnist.load_decoy_mnist(tmp_path, "train")
    dilated = decoy_mnist.load_decoy_mnist(tmp_path, "train", region_dilation=2)
    for i in range(5):
        e, d = exact[i]["region"], dilated[i]["region"]
        assert np.all(d >= e) and d.sum() > e.sum()
        assert d[dilated[i]["wrong_region"] > 0].sum() == 0
    small = decoy_mnist.load_decoy_mnist(tmp_path, "train", image_size=14)[0]
    assert small["image"].shape == (14, 14, 1) and small["region"].shape == (14, 14)
    assert small["wrong_region"].shape == (14, 14) and 0 < small["wrong_region"].max() <= 1
    with pytest.raises(ValueError, match="region_dilation"):
        decoy_mnist.load_decoy_mnist(tmp_path, "train", region_dilation=-1)
    with pytest.raises(ValueError, match="region_threshold"):
        decoy_mnist.load_decoy_mnist(tmp_path, "train", region_threshold=255)
    with pytest.raises(FileNotFoundError):
        decoy_mnist.load_decoy_mnist(tmp_path / "nothing", "train")


@pytest.mark.slow
def test_real_decoy_mnist():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not available")
    train = decoy_mnist.load_decoy_mnist(SHARED_MNIST, "train")
    test = decoy_mnist.load_decoy_mnist(SHARED_MNIST, "test")
    assert len(train) == 60000 and len(test) == 10000
    np.testing.assert_array_equal(train.patch_digits, train.labels)
    assert abs(np.mean(test.patch_digits == test.labels) - 0.1) < 0.015
    patches = decoy_mnist.patch_masks(train.corners[:100])
    np.testing.assert_array_equal(train.images[:100, ..., 0][patches].reshape(100, 16),
                                  np.repeat(decoy_mnist.patch_value(train.labels[:100])[:, None], 16, 1))


# ----------------------------------------------------------------------------------------------------------------
# Region templates.


def test_rasterize_polygons_exact_pixels():
    mask = regions.rasterize_polygons([[(1, 1), (3, 1), (3, 3), (1, 3)]], (5, 6))
    expected = np.zeros((5, 6), np.float32)
    expected[1:4, 1:4] = 1.0
    np.testing.assert_array_equal(mask, expected)
    # Union of two polygons; the frame maps vertex coordinates to the output by the half-pixel rule.
    two = regions.rasterize_polygons([[(0, 0), (1, 0), (1, 1)], [(4, 4), (5, 4), (5, 5), (4, 5)]], (6, 6))
    assert two[0, 0] == 1 and two[5, 5] == 1 and two[2, 2] == 0
    full = regions.rasterize_polygons([[(0, 0), (9, 0), (9, 19), (0, 19)]], (4, 2), frame=(10, 20))
    np.testing.assert_array_equal(full, 1.0)
    half = regions.rasterize_polygons([[(0, 0), (9, 0), (9, 9), (0, 9)]], (4, 2), frame=(10, 20))
    np.testing.assert_array_equal(half[:2], 1.0)
    assert half[3].sum() == 0


def test_rasterize_polygons_errors():
    with pytest.raises(ValueError, match="at least 3 vertices"):
        regions.rasterize_polygons([[(0, 0), (1, 1)]], (4, 4), where="template 'x'")
    with pytest.raises(ValueError, match="number pairs"):
        regions.rasterize_polygons([[(0, 0), (1, "a"), (2, 2)]], (4, 4))
    with pytest.raises(ValueError, match="number pairs"):
        regions.rasterize_polygons([[(0, 0, 1), (1, 1, 1), (2, 2, 1)]], (4, 4))
    with pytest.raises(ValueError, match="finite"):
        regions.rasterize_polygons([[(0, 0), (1, np.nan), (2, 2)]], (4, 4))
    with pytest.raises(ValueError, match="at least one polygon"):
        regions.rasterize_polygons([], (4, 4))
    with pytest.raises(ValueError, match="size"):
        regions.rasterize_polygons([[(0, 0), (1, 0), (1, 1)]], (0, 4))
    with pytest.raises(ValueError, match=r"no region template for \['b'\]"):
        regions.rasterize_templates({"a": [[(0, 0), (1, 0), (1, 1)]]}, ["a", "b"], (4, 4))


def test_template_region_source():
    images = np.zeros((6, 4, 4, 1), np.uint8)
    src = sources.ImageSource(images, np.array([0, 1, 2, 0, 1, 2]), num_classes=3, name="toy")
    templates = np.stack([np.eye(4), np.fliplr(np.eye(4)), np.ones((4, 4))]).astype(np.float32)
    wrapped = regions.TemplateRegionSource(src, templates)
    assert len(wrapped) == 6 and wrapped.num_classes == 3 and wrapped.labels is src.labels
    for i in range(6):
        np.testing.assert_array_equal(wrapped[i]["region"], templates[src.labels[i]])
    with pytest.raises(ValueError, match="num_classes=3"):
        regions.TemplateRegionSource(src, templates[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        regions.TemplateRegionSource(src, templates * 2)
    with pytest.raises(ValueError, match="image size"):
        regions.TemplateRegionSource(src, np.ones((3, 5, 5), np.float32))[0]


# ----------------------------------------------------------------------------------------------------------------
# Regions move with the image.


def test_augment_example_moves_regions_with_the_image():
    rng = np.random.default_rng(0)
    mask = (rng.random((12, 10)) < 0.3).astype(np.float32)
    stacked = np.stack([mask, 1.0 - mask])  # [2, h, w] (one plane per attribute)
    image = np.stack([mask, 1.0 - mask, mask], axis=-1)
    flipped = rotated = 0
    for seed in range(12):
        out, fields = aug.augment_example(image, np.random.default_rng(seed), {"region": mask, "wrong_region": stacked},
                                          hflip=True, rotation=40.0)
        np.testing.assert_allclose(fields["region"], out[..., 0], atol=1e-6)
        np.testing.assert_allclose(fields["wrong_region"][0], out[..., 0], atol=1e-6)
        np.testing.assert_allclose(fields["wrong_region"][1], out[..., 1], atol=1e-6)
        assert fields["wrong_region"].shape == (2, 12, 10)
        rotated += not np.allclose(out, image) and not np.allclose(out, image[:, ::-1])
        draws = np.random.default_rng(seed)
        draws.uniform(-40, 40)
        flipped += draws.uniform() < 0.5
    assert 0 < flipped < 12 and rotated == 12
    # A flip alone is exact.
    for seed in range(6):
        out, fields = aug.augment_example(image, np.random.default_rng(seed), {"region": mask}, hflip=True)
        assert np.array_equal(fields["region"], mask) or np.array_equal(fields["region"], mask[:, ::-1])
        np.testing.assert_array_equal(fields["region"], out[..., 0])


def test_augment_example_equals_augment_and_ignores_photometry_for_regions():
    image = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    region = np.zeros((8, 8), np.float32)
    region[2:5, 1:3] = 1.0
    for seed in range(5):
        plain = aug.augment(image, np.random.default_rng(seed), **aug.PAPER_AUGMENTATION)
        out, fields = aug.augment_example(image, np.random.default_rng(seed), {"region": region},
                                          **aug.PAPER_AUGMENTATION)
        np.testing.assert_array_equal(out, plain)
        # The same draws, in Keras order (angle, shift, flip, brightness); only the geometry touches the region.
        draws = np.random.default_rng(seed)
        angle = draws.uniform(-40.0, 40.0)
        draws.uniform(-30.0, 30.0)
        flip = draws.uniform() < 0.5
        expected = aug.rotate(region[..., None], angle)[..., 0]
        expected = expected[:, ::-1] if flip else expected
        np.testing.assert_allclose(fields["region"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="spatial field 'region'"):
        aug.augment_example(image, np.random.default_rng(0), {"region": np.zeros((8, 7))}, hflip=True)


class RegionSource:
    """Items whose region / wrong region are the image's channels 0 / 1 (so moved regions stay equal to them)."""

    num_classes = 2

    def __init__(self, n=8, side=10):
        rng = np.random.default_rng(0)
        self.masks = (rng.random((n, side, side)) < 0.4).astype(np.float32)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        m = self.masks[i]
        return {"image": np.stack([m, 1.0 - m], -1), "label": np.int32(i % 2), "region": m, "wrong_region": 1.0 - m,
                "decoy_label": np.int32(i)}


def test_train_pipeline_moves_regions_and_passes_fields():
    src = RegionSource()
    ds = pipeline.make_train_dataset(src, None, batch_size=4, seed=0, image_size=8,
                                     augment_kwargs={"hflip": True, "rotation": 30.0})
    for batch in [b for _, b in zip(range(4), iter(ds))]:
        assert set(batch) == {"image", "label", "region", "wrong_region", "decoy_label"}
        assert batch["region"].shape == (4, 8, 8) and batch["region"].dtype == np.float32
        np.testing.assert_allclose(batch["region"], batch["image"][..., 0], atol=1e-6)
        np.testing.assert_allclose(batch["wrong_region"], batch["image"][..., 1], atol=1e-6)
        np.testing.assert_array_equal(batch["label"], batch["decoy_label"] % 2)


def test_spatial_fields_resize_like_the_image_and_eval_padding():
    src = RegionSource(n=5)
    batches = list(pipeline.make_eval_batches(src, batch_size=4, image_size=6))
    assert len(batches) == 2
    last = batches[-1]
    assert last["region"].shape == (4, 6, 6) and last["wrong_region"].shape == (4, 6, 6)
    np.testing.assert_array_equal(last["mask"], [1, 0, 0, 0])
    np.testing.assert_array_equal(last["region"][1:], 0.0)
    np.testing.assert_array_equal(last["decoy_label"], [4, 0, 0, 0])
    np.testing.assert_allclose(batches[0]["region"], batches[0]["image"][..., 0], atol=1e-6)


def test_pipeline_rejects_bad_fields():
    class Bad(RegionSource):
        def __init__(self, field, value):
            super().__init__()
            self.extra = (field, value)

        def __getitem__(self, i):
            item = super().__getitem__(i)
            item[self.extra[0]] = self.extra[1]
            return item

    with pytest.raises(ValueError, match="spatial field 'region'"):
        list(pipeline.make_eval_batches(Bad("region", np.zeros((9, 10))), batch_size=4))
    with pytest.raises(ValueError, match="'mask' field"):
        list(pipeline.make_eval_batches(Bad("mask", np.zeros(())), batch_size=4))


# ----------------------------------------------------------------------------------------------------------------
# CelebA on a generated tree.

ATTRIBUTES_40 = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


def celeba_values(n=6):
    """Hand-set attributes: rows are images, the columns that matter are set below; the rest -1."""
    v = -np.ones((n, 40), int)
    col = ATTRIBUTES_40.index
    v[[0, 1, 3, 4], col("Wearing_Lipstick")] = 1
    v[[0, 3], col("Heavy_Makeup")] = 1          # W.L. without H.M.: images 1, 4
    v[[2, 3, 5], col("High_Cheekbones")] = 1
    v[[2, 5], col("Smiling")] = 1               # H.C. without Smiling: image 3
    v[[1, 5], col("Double_Chin")] = 1
    v[[1], col("Chubby")] = 1                   # D.C. without Chubby: image 5
    return v


def make_celeba(root, n=6, partition=(0, 0, 2, 0, 1, 2), values=None, attr_lines=None, partition_lines=None):
    root = pathlib.Path(root)
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
    values = celeba_values(n) if values is None else values
    if attr_lines is None:
        attr_lines = [str(n), " ".join(ATTRIBUTES_40) + " "]
        attr_lines += [f"{f} " + " ".join(f"{x:2d}" for x in row) for f, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    if partition_lines is None:
        partition_lines = [f"{f} {p}" for f, p in zip(names, partition)]
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return names, values


def test_celeba_loader_labels_splits_and_images(tmp_path):
    names, values = make_celeba(tmp_path)
    train = celeba.load_celeba(tmp_path, "train")
    assert train.filenames == (names[0], names[1], names[3]) and len(train) == 3
    assert train.attributes == celeba.POSTER_ATTRIBUTES and train.num_classes == 3
    cols = [ATTRIBUTES_40.index(a) for a in celeba.POSTER_ATTRIBUTES]
    np.testing.assert_array_equal(train.labels, (values[[0, 1, 3]][:, cols] == 1).astype(np.int32))
    item = train[1]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == (218, 178, 3) and item["image"].dtype == np.float32
    np.testing.assert_array_equal(item["label"], [1, 0, 1])
    assert item["label"].dtype == np.int32
    expected = np.asarray(Image.open(tmp_path / "img_align_celeba" / names[1]).convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(item["image"], expected, atol=1e-6)
    assert len(celeba.load_celeba(tmp_path, "valid")) == 1
    test = celeba.load_celeba(tmp_path, "test", attributes=("Smiling", "Male"), image_size=32)
    assert test.filenames == (names[2], names[5]) and test[0]["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(test.labels, [[1, 0], [1, 0]])


def test_celeba_region_templates(tmp_path):
    make_celeba(tmp_path)
    src = celeba.load_celeba(tmp_path, "train", image_size=64, region_templates=celeba.REGION_TEMPLATES)
    assert src.region_attributes == celeba.POSTER_ATTRIBUTES and src.region_attribute_indices == (0, 1, 2)
    region = src[0]["region"]
    assert region.shape == (3, 64, 64) and region.dtype == np.float32
    np.testing.assert_array_equal(region, regions.rasterize_templates(
        celeba.REGION_TEMPLATES, celeba.POSTER_ATTRIBUTES, (64, 64), celeba.CELEBA_FRAME))
    np.testing.assert_array_equal(src[2]["region"], region)  # the same template for every image
    # Where the templates lie (row/column centroids as fractions of the image): mouth below the cheeks, chin lowest,
    # cheeks on both sides, mouth and chin centred.
    rows = [np.average(np.arange(64), weights=r.sum(1)) / 64 for r in region]
    cols = [np.average(np.arange(64), weights=r.sum(0)) / 64 for r in region]
    assert rows[1] < rows[0] < rows[2] and 0.6 < rows[0] < 0.8 and rows[2] > 0.8
    assert all(abs(c - 0.5) < 0.03 for c in cols)
    assert region[1][:, :26].sum() > 0 and region[1][:, 38:].sum() > 0 and region[1][:, 30:34].sum() == 0
    # Only the chosen attributes that have a template are guided.
    some = celeba.load_celeba(tmp_path, "train", attributes=("Smiling", "Wearing_Lipstick"),
                              region_templates=celeba.REGION_TEMPLATES)
    assert some.region_attributes == ("Wearing_Lipstick",) and some.region_attribute_indices == (1,)
    assert some[0]["region"].shape == (1, 218, 178)
    with pytest.raises(ValueError, match="none of"):
        celeba.load_celeba(tmp_path, "train", attributes=("Smiling",), region_templates=celeba.REGION_TEMPLATES)


def test_celeba_cooccurrence_subsets(tmp_path):
    make_celeba(tmp_path, partition=(0,) * 6)
    src = celeba.load_celeba(tmp_path, "train")
    np.testing.assert_array_equal(celeba.cooccurrence_subset(src, "Wearing_Lipstick"), [1, 4])
    np.testing.assert_array_equal(celeba.cooccurrence_subset(src, "High_Cheekbones"), [3])
    np.testing.assert_array_equal(celeba.cooccurrence_subset(src, "Double_Chin"), [5])
    np.testing.assert_array_equal(celeba.cooccurrence_subset(src, "Wearing_Lipstick", "Male"), [0, 1, 3, 4])
    with pytest.raises(ValueError, match="no default"):
        celeba.cooccurrence_subset(src, "Smiling")
    with pytest.raises(ValueError, match="unknown attribute 'Beard'"):
        celeba.cooccurrence_subset(src, "Smiling", "Beard")


def test_celeba_through_pipeline_into_the_guidance_loss(tmp_path):
    make_celeba(tmp_path, partition=(0,) * 6)
    src = celeba.load_celeba(tmp_path, "train", image_size=16, region_templates=celeba.REGION_TEMPLATES)
    batch = next(iter(pipeline.make_train_dataset(src, None, batch_size=4, seed=0,
                                                  augment_kwargs={"hflip": True})))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].shape == (4, 3)
    assert batch["region"].shape == (4, 3, 16, 16)
    for r in batch["region"]:  # each example's templates, flipped with its image or not
        t = src.region_templates
        assert np.array_equal(r, t) or np.array_equal(r, t[..., ::-1])
    model = SmallCNN(num_classes=3, widths=(4, 4, 4))
    variables = model.init(jax.random.key(0), batch["image"])

    def loss(params):
        layer_model = linen_layer(model, {**variables, "params": params}, "conv3", train=False)
        return jnp.mean(ag.multilabel_guidance_loss(layer_model, batch["image"], batch["label"], batch["region"],
                                                    attributes=src.region_attribute_indices))

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(value) and value > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    evals = list(pipeline.make_eval_batches(src, batch_size=4))
    assert evals[1]["label"].shape == (4, 3) and evals[1]["mask"].tolist() == [1, 1, 0, 0]


def test_celeba_malformed_files(tmp_path):
    def fresh(name, **kwargs):
        root = tmp_path / name
        make_celeba(root, **kwargs)
        return root

    header = " ".join(ATTRIBUTES_40)
    row = "000001.jpg " + " ".join(["-1"] * 40)
    cases = [
        ("count", dict(attr_lines=["six", header, row]), r"list_attr_celeba.txt:1: expected the number of images"),
        ("mismatch", dict(attr_lines=["2", header, row]), "announces 2 images but 1 rows"),
        ("fields", dict(attr_lines=["1", header, row + " 1"]), r":3: expected a file name and 40 values, got 42"),
        ("value", dict(attr_lines=["1", header, row.replace("-1", "0", 1)]),
         r":3: attribute '5_o_Clock_Shadow' of '000001.jpg' is '0'; values must be 1 or -1"),
        ("dup_header", dict(attr_lines=["1", header + " Young", row + " 1"]), r"repeated attribute names \['Young'\]"),
        ("dup_file", dict(attr_lines=["2", header, row, row]), r":4: file '000001.jpg' listed twice"),
        ("short", dict(attr_lines=["1"]), "needs a count line and a header line"),
        ("partition_value", dict(partition_lines=["000001.jpg 3"]), r"list_eval_partition.txt:1: expected"),
        ("partition_fields", dict(partition_lines=["000001.jpg"]), r"list_eval_partition.txt:1: expected"),
        ("partition_dup", dict(partition_lines=["000001.jpg 0", "000001.jpg 1"]), ":2: file '000001.jpg' listed twice"),
        ("partition_missing", dict(partition_lines=["000001.jpg 0"]), r"5 image\(s\) .* are not in"),
    ]
    for name, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            celeba.load_celeba(fresh(name, **kwargs), "train")
    root = fresh("ok")
    with pytest.raises(ValueError, match=r"unknown attributes \['Beard'\]"):
        celeba.load_celeba(root, "train", attributes=("Beard",))
    with pytest.raises(ValueError, match="split"):
        celeba.load_celeba(root, "val")
    with pytest.raises(ValueError, match="split 'valid' is empty"):
        celeba.load_celeba(fresh("noval", partition=(0, 0, 0, 0, 2, 2)), "valid")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        celeba.load_celeba(root, "train")
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        celeba.load_celeba(tmp_path, "train")
    # Images: undecodable, wrong size.
    root = fresh("images")
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (100, 100)).save(root / "img_align_celeba" / "000004.jpg")
    src = celeba.load_celeba(root, "train")
    assert src[0]["image"].shape == (218, 178, 3)
    with pytest.raises(ValueError, match="Cannot decode CelebA image .*000002.jpg"):
        src[1]
    with pytest.raises(ValueError, match="000004.jpg is 100 x 100"):
        src[2]
