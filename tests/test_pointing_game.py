"""Tests of the pointing game (saliency_jax.evaluation.pointing_game), the VOC / COCO loaders and the runner.

References are hand-computed (distances, class-mean arithmetic, box pixel counts, RLE strings derived by hand from
COCO's encoding rules) or independent (scipy's Euclidean distance transform, NumPy argmax).
"""

import copy
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from saliency_jax.data import coco, voc
from saliency_jax.evaluation import pointing_game as pg

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# pointing_hits


def _single(shape, points):
    """bool [len(points), *shape] with one True pixel per example."""
    masks = np.zeros((len(points), *shape), bool)
    for b, (r, c) in enumerate(points):
        masks[b, r, c] = True
    return masks


def test_hit_at_exactly_15_miss_at_16():
    peak = (20, 20)
    # Offsets from the peak: 15 (straight down), 16, (9, 12) = 15 (diagonal), (9, 13) = 15.81, (12, 9) = 15.
    offsets = [(15, 0), (16, 0), (9, 12), (9, 13), (12, 9), (0, -15), (0, -16)]
    maps = np.zeros((len(offsets), 50, 50), np.float32)
    maps[:, peak[0], peak[1]] = 1.0
    masks = _single((50, 50), [(peak[0] + dr, peak[1] + dc) for dr, dc in offsets])
    hits = jax.jit(pg.pointing_hits)(maps, masks)
    assert hits.dtype == jnp.bool_
    np.testing.assert_array_equal(hits, [True, False, True, False, True, True, False])
    # TorchRay's strict "<" is reproduced with a tolerance just below 15.
    np.testing.assert_array_equal(pg.pointing_hits(maps, masks, tolerance=15 - 1e-3),
                                  [False, False, False, False, False, False, False])
    # tolerance 0: only a point on the region.
    on = _single((50, 50), [peak])
    assert bool(pg.pointing_hits(maps[:1], on, tolerance=0)[0])


def test_hits_match_distance_transform_reference():
    rng = np.random.default_rng(0)
    batch, h, w = 64, 37, 45
    maps = rng.normal(size=(batch, h, w)).astype(np.float32)
    masks = np.zeros((batch, h, w), bool)
    for b in range(batch):  # one random box per example, some far away from everything
        r0, c0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
        masks[b, r0:r0 + rng.integers(1, 4), c0:c0 + rng.integers(1, 4)] = True
    for tolerance in (3, 7.5, 15):
        got = np.asarray(pg.pointing_hits(maps, masks, tolerance=tolerance))
        expected = []
        for b in range(batch):
            r, c = np.unravel_index(np.argmax(maps[b]), (h, w))
            distance = ndimage.distance_transform_edt(~masks[b])  # distance to the nearest region pixel
            expected.append(distance[r, c] <= tolerance)
        np.testing.assert_array_equal(got, expected)
        assert 0 < got.sum() < batch  # both outcomes occur


def test_argmax_ties_take_first_in_row_major_order():
    maps = np.zeros((3, 4, 5), np.float32)
    maps[0, 2, 1] = maps[0, 1, 3] = 7.0  # row 1 comes first
    maps[1, 3, 0] = maps[1, 3, 4] = 2.0  # same row: smaller column
    # maps[2] is constant: first pixel.
    np.testing.assert_array_equal(pg.argmax_points(maps), [[1, 3], [3, 0], [0, 0]])


def test_maps_at_a_lower_resolution_are_resized_to_the_masks():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[:, 1, 2] = 1.0  # the block rows 10-19, cols 20-29 of a 40x40 image
    masks = _single((40, 40), [(15, 25), (35, 5)])
    np.testing.assert_array_equal(pg.pointing_hits(maps, masks, tolerance=2), [True, False])


def test_hits_at_points_float_points_and_empty_mask():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 0, 5] = True
    points = np.array([[3.5, 5.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(pg.hits_at_points(points, masks, tolerance=3.5), [True, False])
    np.testing.assert_array_equal(pg.hits_at_points(points, masks, tolerance=3.4), [False, False])


def test_pointing_hits_errors():
    maps = np.zeros((2, 8, 8), np.float32)
    masks = np.zeros((2, 8, 8), bool)
    with pytest.raises(ValueError, match="tolerance"):
        pg.pointing_hits(maps, masks, tolerance=-1)
    with pytest.raises(ValueError, match="tolerance"):
        pg.pointing_hits(maps, masks, tolerance=float("nan"))
    with pytest.raises(ValueError, match="batch"):
        pg.pointing_hits(maps, masks[:1])
    with pytest.raises(ValueError, match=r"\[batch, h, w\]"):
        pg.pointing_hits(maps[0], masks)
    with pytest.raises(TypeError, match="bool"):
        pg.pointing_hits(maps, masks.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        pg.hits_at_points(np.zeros((2, 3)), masks)


# ---------------------------------------------------------------------------------------------------------------
# PointingGame


def test_pointing_game_class_mean_arithmetic_and_difficult_subset():
    # class 0: hit, hit, miss -> 2/3; class 1: miss, miss -> 0; class 2: hit -> 1; class 3: no trial.
    hits = np.array([True, True, False, False, False, True])
    classes = np.array([0, 0, 0, 1, 1, 2])
    images = ["a", "b", "c", "a", "b", "c"]
    difficult = {"a": np.array([1, 1, 0, 0], bool), "b": np.array([0, 0, 0, 0], bool),
                 "c": np.array([1, 0, 1, 0], bool)}
    game = pg.PointingGame(4, class_names=["w", "x", "y", "z"], difficult=difficult)
    game.update(hits[:2], classes[:2], images[:2])  # two batches add up
    game.update(hits[2:], classes[2:], images[2:])
    np.testing.assert_array_equal(game.hits, [2, 0, 1, 0])
    np.testing.assert_array_equal(game.misses, [1, 2, 0, 0])
    np.testing.assert_allclose(game.class_accuracies()[:3], [2 / 3, 0, 1])
    assert np.isnan(game.class_accuracies()[3])
    assert game.accuracy() == pytest.approx((2 / 3 + 0 + 1) / 3)  # 5/9, class 3 left out
    # Difficult pairs: (a, 0) hit, (c, 0) miss, (a, 1) miss, (c, 2) hit -> class 0: 1/2, class 1: 0, class 2: 1.
    np.testing.assert_array_equal(game.difficult_hits, [1, 0, 1, 0])
    np.testing.assert_array_equal(game.difficult_misses, [1, 1, 0, 0])
    assert game.accuracy("difficult") == pytest.approx((0.5 + 0 + 1) / 3)
    res = game.results()
    assert res["all"] == pytest.approx(5 / 9) and res["difficult"] == pytest.approx(0.5)
    assert res["per_class"]["all"] == pytest.approx({"w": 2 / 3, "x": 0.0, "y": 1.0})
    assert res["hits"] == {"w": 2, "x": 0, "y": 1, "z": 0} and res["trials"] == 6 and res["difficult_trials"] == 4
    json.dumps(res)
    game.reset()
    assert np.isnan(game.accuracy()) and game.hits.sum() == 0


def test_pointing_game_errors():
    game = pg.PointingGame(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        game.update(np.array([True]), np.array([3]))
    with pytest.raises(TypeError, match="boolean"):
        game.update(np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        game.update(np.array([True, False]), np.array([0]))
    with pytest.raises(ValueError, match="difficult flags"):
        game.accuracy("difficult")
    flagged = pg.PointingGame(3, difficult={"a": np.zeros(3, bool)})
    with pytest.raises(ValueError, match="image_ids are required"):
        flagged.update(np.array([True]), np.array([0]))
    with pytest.raises(ValueError, match="not listed.*'b'"):
        flagged.update(np.array([True]), np.array([0]), ["b"])
    with pytest.raises(ValueError, match=r"bool \[3\]"):
        pg.PointingGame(3, difficult={"a": np.zeros(2, bool)})


def test_load_difficult_flags(tmp_path):
    path = tmp_path / "flags.txt"
    path.write_text("000001\t0\t1\t0\n000002\t1\t1\t0\n\n")
    flags = pg.load_difficult_flags(path, 3)
    assert list(flags) == ["000001", "000002"]
    np.testing.assert_array_equal(flags["000001"], [False, True, False])
    with pytest.raises(ValueError, match=r"flags.txt:1: expected an image id and 4 flags"):
        pg.load_difficult_flags(path, 4)
    bad = tmp_path / "bad.txt"
    bad.write_text("000001\t0\t2\t0\n")
    with pytest.raises(ValueError, match="0 or 1"):
        pg.load_difficult_flags(bad, 3)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        pg.load_difficult_flags(tmp_path / "missing.txt", 3)


def test_pointing_game_table():
    results = {"vgg16": {"center": {"all": 0.696, "difficult": 0.424}, "grad_cam": {"all": 0.866}},
               "resnet50": {"grad_cam": {"all": 0.904, "difficult": float("nan")}}}
    table = pg.pointing_game_table(results, title="VOC07")
    lines = table.splitlines()
    assert lines[0] == "VOC07"
    assert lines[2] == "| method | vgg16 all | vgg16 difficult | resnet50 all | resnet50 difficult |"
    assert lines[4] == "| center | 69.6 | 42.4 | - | - |"
    assert lines[5] == "| grad_cam | 86.6 | - | 90.4 | - |"


# ---------------------------------------------------------------------------------------------------------------
# A tiny PASCAL VOC tree. Centre points and expected centre-baseline hits are worked out beside each image.

_XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>{image_id}.jpg</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
{objects}</annotation>
"""
_OBJ = """  <object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
    <difficult>{difficult}</difficult>
    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>
"""

# (image_id, width, height, [(name, xmin, ymin, xmax, ymax, difficult)])
_VOC_IMAGES = [
    # centre (row 32, col 48): dog box rows 24-39, cols 39-55 contains it -> hit; person rows/cols 0-9 -> miss.
    ("000001", 96, 64, [("dog", 40, 25, 56, 40, 0), ("person", 1, 1, 10, 10, 0), ("chair", 80, 50, 90, 60, 1)]),
    # centre (40, 32): cat rows/cols 0-19, nearest (19, 19) at 24.7 px -> miss; dog rows 49-59, cols 29-39,
    # nearest (49, 32) at 9 px -> hit.
    ("000002", 64, 80, [("cat", 1, 1, 20, 20, 0), ("dog", 30, 50, 40, 60, 0)]),
    # centre (32, 32): car boxes rows/cols 0-4 and 59-63 -> miss; person rows 47-50, cols 32-35: (47, 32) is at
    # exactly 15 px -> hit.
    ("000003", 64, 64, [("car", 1, 1, 5, 5, 0), ("car", 60, 60, 64, 64, 0), ("person", 33, 48, 36, 51, 0)]),
]
# difficult flags (class ids: car 6, cat 7, dog 11, person 14)
_DIFFICULT = {"000001": {11, 14}, "000002": {7}, "000003": {6}}


def _write_voc(root, images=_VOC_IMAGES, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, width, height, objects in images:
        objs = "".join(_OBJ.format(name=n, xmin=x0, ymin=y0, xmax=x1, ymax=y1, difficult=d)
                       for n, x0, y0, x1, y1, d in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            _XML.format(image_id=image_id, width=width, height=height, objects=objs))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i[0]}\n" for i in images))
    return root


def _write_flags(path):
    lines = []
    for image_id, classes in _DIFFICULT.items():
        lines.append("\t".join([image_id] + ["1" if c in classes else "0" for c in range(20)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_voc_parse_classes_and_masks(tmp_path):
    root = _write_voc(tmp_path / "VOCdevkit" / "VOC2007")
    data = voc.load_voc(tmp_path)  # finds VOCdevkit/VOC2007
    assert len(data) == 3 and data.num_classes == 20
    ann = data.annotations[0]
    assert (ann.image_id, ann.filename, ann.width, ann.height) == ("000001", "000001.jpg", 96, 64)
    assert ann.objects[0] == voc.VOCObject("dog", 11, (40, 25, 56, 40), False)
    assert ann.objects[2].difficult
    assert ann.class_ids == (11, 14)  # chair has only a difficult box: not evaluated
    assert ann.all_class_ids == (8, 11, 14)
    masks = ann.class_masks()
    assert masks.shape == (20, 64, 96) and masks.dtype == bool
    assert masks[11].sum() == 16 * 17  # rows 24..39 x cols 39..55
    assert masks[11, 24, 39] and masks[11, 39, 55] and not masks[11, 23, 39] and not masks[11, 24, 56]
    assert masks[8].sum() == 11 * 11  # the difficult chair box is still drawn
    assert masks[[c for c in range(20) if c not in (8, 11, 14)]].sum() == 0
    # Two boxes of one class: union.
    car = data.annotations[2].class_masks()[6]
    assert car.sum() == 2 * 25 and car[0, 0] and car[63, 63]
    item = data[1]
    assert item["image_id"] == "000002" and item["image"].shape == (80, 64, 3)
    assert item["image"].dtype == np.float32 and 0.0 <= item["image"].min() <= item["image"].max() <= 1.0
    np.testing.assert_array_equal(item["class_ids"], [7, 11])
    assert item["class_masks"].shape == (20, 80, 64)
    assert voc.VOC_CLASSES[11] == "dog" and len(voc.VOC_CLASSES) == 20
    assert voc.read_image_set(root) == ["000001", "000002", "000003"]


def test_voc_errors(tmp_path):
    root = _write_voc(tmp_path / "VOC2007")
    (root / "Annotations" / "000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match="000002.xml"):
        voc.load_voc(root)
    (root / "Annotations" / "000002.xml").write_text("<annotation><size><width>4</width>")
    with pytest.raises(ValueError, match="000002.xml"):
        voc.load_voc(root)
    (root / "Annotations" / "000002.xml").write_text(
        _XML.format(image_id="000002", width=64, height=80, objects=_OBJ.format(
            name="unicorn", xmin=1, ymin=1, xmax=2, ymax=2, difficult=0)))
    with pytest.raises(ValueError, match="000002.xml.*unicorn"):
        voc.load_voc(root)
    (root / "Annotations" / "000002.xml").write_text(
        _XML.format(image_id="000002", width=64, height=80, objects=_OBJ.format(
            name="cat", xmin=9, ymin=1, xmax=2, ymax=2, difficult=0)))
    with pytest.raises(ValueError, match="000002.xml.*inverted"):
        voc.load_voc(root)
    (root / "Annotations" / "000002.xml").write_text("<annotation><filename>x.jpg</filename></annotation>")
    with pytest.raises(ValueError, match="000002.xml.*<size>"):
        voc.load_voc(root)
    with pytest.raises(FileNotFoundError, match="trainval.txt"):
        voc.load_voc(root, "trainval")
    with pytest.raises(FileNotFoundError, match="Annotations"):
        voc.load_voc(tmp_path / "nowhere")
    # An image whose size disagrees with its XML.
    root2 = _write_voc(tmp_path / "other" / "VOC2007")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root2 / "JPEGImages" / "000001.jpg")
    with pytest.raises(ValueError, match="000001.jpg.*10x10"):
        voc.load_voc(root2)[0]
    (root2 / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"):
        voc.load_voc(root2)[1]


# ---------------------------------------------------------------------------------------------------------------
# COCO RLE and polygons (pycocotools behind rle_decode / rle_encode / polygons_to_mask)


def _mask_from_counts(counts, height, width):
    """Column-major runs 0, 1, 0, ... -> bool [height, width] (the COCO RLE definition, written out)."""
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
    return flat.reshape(width, height).T


def test_rle_strings_hand_encoded():
    # COCO's string code: 5-bit groups, low first, char = 48 + group (+ 0x20 if more follow); bit 0x10 of the last
    # group is the sign; from index 3 on the value stored is counts[i] - counts[i - 2].
    # [3, 40, 10, 30]: 3 -> '3'; 40 = 8 + 1 * 32 -> chr(48 + 8 + 32) 'X', chr(48 + 1) '1'; 10 -> ':';
    # 30 - 40 = -10 -> low 5 bits 22 (sign bit set, rest -1) -> chr(48 + 22) 'F'. 83 pixels: a 1 x 83 mask.
    expected = _mask_from_counts([3, 40, 10, 30], 1, 83)
    np.testing.assert_array_equal(coco.rle_decode({"size": [1, 83], "counts": "3X1:F"}), expected)
    assert coco.rle_encode(expected) == {"size": [1, 83], "counts": "3X1:F"}
    # 1000 = 8 + 31 * 32: 'X' (8 | 0x20), 'o' (31 | 0x20: more, since bit 0x10 is set and the rest is 0), '0'.
    assert coco.rle_encode(np.zeros((10, 100), bool)) == {"size": [10, 100], "counts": "Xo0"}
    assert not coco.rle_decode({"size": [10, 100], "counts": b"Xo0"}).any()
    with pytest.raises(ValueError, match="invalid compressed RLE"):
        coco.rle_decode({"size": [3, 4], "counts": "X"})  # truncated inside a value
    with pytest.raises(ValueError, match="invalid compressed RLE"):
        coco.rle_decode({"size": [3, 4], "counts": "3 "})  # character outside the code
    with pytest.raises(ValueError, match="does not cover"):
        coco.rle_decode({"size": [3, 4], "counts": "12"})  # runs 1, 2 cover 3 of 12 pixels


def test_rle_decode_column_major_hand_built():
    # 3 x 4 mask, counts [1, 2, 3, 6] over the column-major order: 0 | 1 1 | 0 0 0 | 1 1 1 1 1 1.
    expected = np.array([[0, 0, 1, 1],
                         [1, 0, 1, 1],
                         [1, 0, 1, 1]], bool)
    np.testing.assert_array_equal(coco.rle_decode({"size": [3, 4], "counts": [1, 2, 3, 6]}), expected)
    np.testing.assert_array_equal(coco.rle_decode({"size": [3, 4], "counts": "1234"}), expected)  # 6 stored as 4
    assert coco.rle_encode(expected) == {"size": [3, 4], "counts": "1234"}
    starts_with_one = expected.copy()
    starts_with_one[0, 0] = True  # column 0 all ones: counts [0, 3, 3, 6]; 6 is stored as 6 - 3 = 3
    assert coco.rle_encode(starts_with_one)["counts"] == "0333"
    np.testing.assert_array_equal(coco.rle_decode(coco.rle_encode(starts_with_one)), starts_with_one)
    with pytest.raises(ValueError, match="sum to 11"):
        coco.rle_decode({"size": [3, 4], "counts": [1, 2, 3, 5]})
    with pytest.raises(ValueError, match="non-negative"):
        coco.rle_decode({"size": [3, 4], "counts": [1, -2, 3, 10]})
    with pytest.raises(TypeError, match="str or a list"):
        coco.rle_decode({"size": [3, 4], "counts": 12})


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (5, 7), (31, 17), (64, 48)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < p
            rle = coco.rle_encode(mask)
            np.testing.assert_array_equal(coco.rle_decode(rle), mask)
            # Uncompressed counts written out by hand decode to the same mask.
            flat = mask.T.reshape(-1)
            change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
            counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
            counts = [0] + counts if flat[0] else counts
            np.testing.assert_array_equal(coco.rle_decode({"size": list(shape), "counts": counts}), mask)


def test_polygons_to_mask():
    # pycocotools' scan conversion: pixels whose centre (x + 0.5, y + 0.5) is inside. The rectangle with corners
    # (x, y) = (2, 2) and (7, 5) covers rows 2..4, cols 2..6 (area 5 x 3 = 15).
    mask = coco.polygons_to_mask([[2, 2, 7, 2, 7, 5, 2, 5]], 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[2:5, 2:7] = True
    np.testing.assert_array_equal(mask, expected)
    # Union of two polygons: the unit square at the origin (pixel (0, 0)) and a half-pixel triangle (no centre
    # inside: nothing); a 3 x 2 rectangle at (5, 6).
    two = coco.polygons_to_mask([[0, 0, 1, 0, 1, 1, 0, 1], [8, 8, 9, 8, 9, 9], [5, 6, 8, 6, 8, 8, 5, 8]], 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[0, 0] = True
    expected[6:8, 5:8] = True
    np.testing.assert_array_equal(two, expected)
    # A segment (4 coordinates, which pycocotools alone would read as a box) and a point have no area.
    assert not coco.polygons_to_mask([[1, 1, 4, 4], [2, 2]], 6, 6).any()
    with pytest.raises(ValueError, match="even number"):
        coco.polygons_to_mask([[1, 2, 3]], 5, 5)
    with pytest.raises(ValueError, match="non-finite"):
        coco.polygons_to_mask([[1, 2, 3, np.nan, 4, 4]], 5, 5)


def _write_coco(root):
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    h, w = 12, 16
    square = np.zeros((h, w), bool)
    square[6:9, 10:14] = True  # compressed RLE instance of category 1
    crowd = np.zeros((h, w), bool)
    crowd[0:2, 0:3] = True  # uncompressed RLE of category 18, counts by hand (column-major):
    # cols 0-2: 2 ones then 10 zeros each; cols 3-15: 13 x 12 zeros.
    crowd_counts = [0, 2, 10, 2, 10, 2, 10 + 13 * 12]
    dataset = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": h, "width": w},
            {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": h, "width": w},
            {"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "height": h, "width": w},  # no annotation
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},  # rows 1-3, cols 1-4 (pycocotools)
            {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": coco.rle_encode(square)["counts"]}},
            {"id": 3, "image_id": 42, "category_id": 18, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": crowd_counts}},
            {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": [[10, 0, 12, 0, 12, 2]]},
        ],
    }
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(dataset))
    for record in dataset["images"]:
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "val2014" / record["file_name"])
    return square, crowd


def test_coco_loader_class_masks(tmp_path):
    square, crowd = _write_coco(tmp_path)
    data = coco.load_coco(tmp_path)
    assert data.category_ids == (1, 3, 18) and data.class_names == ("person", "car", "dog")
    assert len(data) == 2  # the image without annotations is skipped
    assert [r["id"] for r in data.images] == [7, 42]  # increasing id
    item = data[1]
    assert item["image_id"] == "COCO_val2014_000000000042" and item["coco_id"] == 42
    np.testing.assert_array_equal(item["class_ids"], [0, 2])
    masks = item["class_masks"]
    assert masks.shape == (3, 12, 16)
    person = np.zeros((12, 16), bool)
    person[1:4, 1:5] = True
    np.testing.assert_array_equal(masks[0], person | square)  # polygon and compressed RLE, union
    np.testing.assert_array_equal(masks[2], crowd)  # uncompressed RLE
    assert not masks[1].any()
    assert data[0]["class_masks"][1].sum() > 0
    assert len(coco.load_coco(tmp_path, limit=1)) == 1
    assert len(coco.load_coco_instances(tmp_path / "annotations" / "instances_val2014.json", skip_empty=False)) == 3


def test_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2014.json"):
        coco.load_coco(tmp_path)
    _write_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2014.json"
    dataset = json.loads(path.read_text())
    dataset["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="unknown category id 99"):
        coco.load_coco(tmp_path)
    dataset["annotations"][0]["category_id"] = 1
    dataset["annotations"][1]["segmentation"]["size"] = [5, 5]
    path.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="annotation 2.*RLE size"):
        coco.load_coco(tmp_path)[1]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2014.json"):
        coco.load_coco(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The pointing-game evaluator through the experiment runner, on the tiny VOC tree with tiny random models.


def _config(tmp_path, methods, models=("vgg16",), images=_VOC_IMAGES):
    spec = importlib.util.spec_from_file_location("pg_config", REPO / "experiments/configs/pointing_game_voc07.py")
    cfg_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_module)
    config = cfg_module.get_config("runlocal")
    config.pointing_game.data_dir = str(_write_voc(tmp_path / "VOC2007", images))
    config.pointing_game.difficult_flags = str(_write_flags(tmp_path / "flags.txt"))
    config.pointing_game.methods = methods
    config.experiment.arms = tuple(a for a in config.experiment.arms if a[0] in models)
    return config


def test_reference_config():
    from saliency_jax import train
    from saliency_jax.evaluators import pointing_game as pge
    from saliency_jax.experiment import arm_config, check_config

    spec = importlib.util.spec_from_file_location("pg_config", REPO / "experiments/configs/pointing_game_voc07.py")
    cfg_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_module)
    config = cfg_module.get_config()
    # The weights and the VOC tree are not here: refused up front, naming the field (issue 24); the rest checks.
    with pytest.raises(FileNotFoundError, match="config.model.pretrained='weights/vgg16_voc.safetensors'"):
        check_config(config)
    for arm in ("vgg16", "resnet50"):
        train.validate(arm_config(config, arm, 0), data=False)
    config.weights.vgg16, config.weights.resnet50 = __file__, __file__  # files that exist: the VOC tree is next
    with pytest.raises(FileNotFoundError, match="config.pointing_game.data_dir='data/VOCdevkit/VOC2007'"):
        check_config(config)
    config.weights.vgg16, config.weights.resnet50 = "weights/vgg16_voc.safetensors", "weights/resnet50_voc.safetensors"
    vgg, resnet = arm_config(config, "vgg16", 0), arm_config(config, "resnet50", 0)
    assert dict(vgg.pointing_game.layers) == {"grad_cam": "relu5_3", "excitation_backprop": "pool4",
                                              "contrastive_excitation_backprop": "pool4", "contrast": "relu7"}
    assert dict(resnet.pointing_game.layers) == {"grad_cam": "layer4", "excitation_backprop": "layer3",
                                                 "contrastive_excitation_backprop": "layer3", "contrast": "avgpool"}
    assert vgg.model.name == "vgg16" and vgg.model.pretrained == "weights/vgg16_voc.safetensors"
    assert config.pointing_game.tolerance == 15 and config.pointing_game.input_size == 224
    assert not config.model.allow_random_init and config.num_steps == 0 and config.num_epochs == 0
    # A weights path given on the command line reaches its arm (the arms refer to config.weights).
    config.weights.vgg16 = "/elsewhere/vgg16.safetensors"
    assert arm_config(config, "vgg16", 0).model.pretrained == "/elsewhere/vgg16.safetensors"
    assert pge.input_shape(375, 500, 224) == (224, 298)  # int(224 * 500 / 375) = 298
    assert pge.input_shape(500, 333, 224) == (336, 224)


def test_missing_weights_fail_before_evaluation(tmp_path):
    from saliency_jax import train
    from saliency_jax.experiment import arm_config

    config = _config(tmp_path, ("center",))
    cfg = arm_config(config, "vgg16", 0)
    cfg.model.allow_random_init = False
    cfg.model.pretrained = ""
    with pytest.raises(ValueError, match="no weights to evaluate"):
        train.train(cfg, tmp_path / "run", progress=False)
    cfg.model.pretrained = str(tmp_path / "nonexistent" / "vgg16.safetensors")
    with pytest.raises(FileNotFoundError, match="vgg16.safetensors"):
        train.train(cfg, tmp_path / "run", progress=False)


def test_runner_center_baseline_hand_computed(tmp_path):
    from saliency_jax.experiment import run_experiment

    config = _config(tmp_path, ("center",))
    out = run_experiment(config, tmp_path / "out", progress=False)
    res = out["summary"]["vgg16"]["pointing_game"]["center"]
    # dog: 2/2, person: 1/2, cat: 0/1, car: 0/1 -> (1 + 0.5 + 0 + 0) / 4.
    assert res["per_class"]["all"] == {"car": 0.0, "cat": 0.0, "dog": 1.0, "person": 0.5}
    assert res["all"] == pytest.approx(0.375)
    # difficult pairs: (1, dog) hit, (1, person) miss, (2, cat) miss, (3, car) miss.
    assert res["per_class"]["difficult"] == {"car": 0.0, "cat": 0.0, "dog": 1.0, "person": 0.0}
    assert res["difficult"] == pytest.approx(0.25)
    assert "| center | 37.5 | 25.0 |" in (tmp_path / "out" / "pointing_game.md").read_text()
    assert "| center | 37.5 | 25.0 |" in (tmp_path / "out" / "report.md").read_text()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["summary"]["vgg16"]["pointing_game"]["center"]["all"] == pytest.approx(0.375)


# Two images of one size (one compilation per method), two classes each.
_SAME_SIZE_IMAGES = [
    ("000001", 64, 64, [("dog", 40, 25, 56, 40, 0), ("person", 1, 1, 10, 10, 0)]),
    ("000003", 64, 64, [("car", 1, 1, 5, 5, 0), ("car", 60, 60, 64, 64, 0), ("person", 33, 48, 36, 51, 0)]),
]


def test_runner_maps_match_per_example_reference(tmp_path):
    from saliency_jax import train
    from saliency_jax.experiment import arm_config, run_experiment

    methods = ("grad_cam", "excitation_backprop", "contrastive_excitation_backprop")
    config = _config(tmp_path, methods, images=_SAME_SIZE_IMAGES)
    config.pointing_game.class_batch = 3  # two classes per image: every batch is padded by one
    out = run_experiment(config, tmp_path / "out", progress=False)
    results = out["summary"]["vgg16"]["pointing_game"]
    # Independent recomputation: one (image, class) at a time, no batching or padding, NumPy argmax and scipy's
    # distance transform for the hit test; the model as train() builds it for the arm (random init, seed 0).
    from saliency_jax.saliency import grad_cam, linen_layer, resize_maps
    from saliency_jax.saliency.excitation_backprop import contrastive_excitation_backprop, excitation_backprop

    cfg = arm_config(config, "vgg16", 0)
    run = train.train(cfg, tmp_path / "again", progress=False)
    module, variables = run.model.module, run.variables
    saliency_fns = {
        "grad_cam": lambda m, x, c: grad_cam(m, x, c, resize=False, normalize=False),
        "excitation_backprop": lambda m, x, c: excitation_backprop(m, x, c).saliency,
        "contrastive_excitation_backprop": lambda m, x, c: contrastive_excitation_backprop(m, x, c).saliency,
    }
    data = voc.load_voc(config.pointing_game.data_dir)
    for method in methods:
        model = linen_layer(module, variables, cfg.pointing_game.layers[method], train=False)
        one_map = jax.jit(lambda x, c, fn=saliency_fns[method], model=model: resize_maps(fn(model, x, c), (64, 64)))
        hits, misses = np.zeros(20, int), np.zeros(20, int)
        for index in range(len(data)):
            item = data[index]
            x = jnp.asarray(item["image"][None])  # 64 x 64 is already the network input size
            for c in item["class_ids"]:
                saliency = np.asarray(one_map(x, jnp.array([c], jnp.int32)))[0]
                r, col = np.unravel_index(np.argmax(saliency), saliency.shape)
                hit = ndimage.distance_transform_edt(~item["class_masks"][c])[r, col] <= 15
                (hits if hit else misses)[c] += 1
        assert results[method]["trials"] == 4 and results[method]["difficult_trials"] == 3
        assert results[method]["hits"] == {n: int(h) for n, h in zip(voc.VOC_CLASSES, hits)}, method
        assert results[method]["misses"] == {n: int(m) for n, m in zip(voc.VOC_CLASSES, misses)}, method


def test_runner_checks_contrast_layer(tmp_path):
    from saliency_jax.experiment import run_experiment

    config = _config(tmp_path, ("contrastive_excitation_backprop",))
    override = copy.deepcopy(dict(config.experiment.arms)["vgg16"])
    override["pointing_game"]["layers"]["contrast"] = "relu6"
    config.experiment.arms = (("vgg16", override),)
    with pytest.raises(ValueError, match="relu7"):
        run_experiment(config, tmp_path / "out", progress=False)


def test_saliency_fn_is_the_registrys_layer_map_exactly():
    """The runner's maps are saliency_map's layer-resolution map (extras["layer_map"], unnormalised) on a linen view,
    equal element for element to the low-level calls the runner made before it went through the registry."""
    from saliency_jax.evaluators import pointing_game as pge
    from saliency_jax.models import SmallCNN
    from saliency_jax.saliency import (contrastive_excitation_backprop, excitation_backprop, grad_cam, linen_layer,
                                       linen_view, saliency_map)

    module = SmallCNN(num_classes=3, widths=(2, 3, 4), use_batchnorm=False)
    images = jax.random.uniform(jax.random.key(0), (3, 12, 16, 3))
    variables = module.init(jax.random.key(1), images)
    targets = jnp.array([0, 2, 1], jnp.int32)
    before = {  # the runner's former private table
        "grad_cam": lambda m, x, t: grad_cam(m, x, t, resize=False, normalize=False),
        "excitation_backprop": lambda m, x, t: excitation_backprop(m, x, t, resize=False, normalize=False).saliency,
        "contrastive_excitation_backprop": lambda m, x, t: contrastive_excitation_backprop(
            m, x, t, resize=False, normalize=False).saliency,
    }
    assert set(before) == set(pge.METHODS[1:]) and pge.METHODS[0] == "center"
    for method, low in before.items():
        got = pge.make_saliency_fn(module, method, "conv2")(variables, images, targets)
        view = linen_view(module, variables, "conv2", train=False)
        want = jax.jit(lambda x, t, method=method: saliency_map(method, view, x, t, normalize=False,
                                                                return_extras=True).extras["layer_map"])
        assert got.shape == (3, 6, 8)
        np.testing.assert_array_equal(got, want(images, targets), err_msg=method)
        lm = linen_layer(module, variables, "conv2", train=False)
        np.testing.assert_array_equal(got, jax.jit(lambda x, t, low=low: low(lm, x, t))(images, targets),
                                      err_msg=method)
    with pytest.raises(ValueError, match="unknown method"):
        pge.make_saliency_fn(module, "center", "conv2")
