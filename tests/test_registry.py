"""The Registry type (saliency_jax.registry) and the registries built on it."""

import pytest

from saliency_jax import data as data_lib
from saliency_jax import evaluators, models, training
from saliency_jax.registry import Registry, name_list


def test_register_get_metadata_names():
    reg = Registry("widget")

    @reg.register("b", size=2)
    def b():
        return "b"

    def a():
        return "a"

    assert reg.register("a", a, check=len) is a
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.get("b") is b and reg.metadata("b")["size"] == 2 and reg.entry("a") == (a, {"check": len})
    with pytest.raises(TypeError):
        reg.metadata("b")["size"] = 3  # read-only
    reg.register("a", a, check=str)  # the same value again: its metadata is replaced
    assert reg.metadata("a")["check"] is str
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a", lambda: None)
    with pytest.raises(ValueError, match=r"unknown widget 'bb'; did you mean \['b'\]\? \(registered: \['a', 'b'\]\)"):
        reg.get("bb")
    with pytest.raises(ValueError, match=r"^unknown widget 'zzz' \(registered: \['a', 'b'\]\)$"):
        reg.metadata("zzz")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", a)


def test_view_is_live_and_read_only():
    reg = Registry("model")
    reg.register("x", object, layer="l1")
    reg.register("y", object)
    view = reg.view("layer")
    assert dict(view) == {"x": "l1"} and view.get("y") is None
    reg.register("z", int, layer="l3")
    assert list(view) == ["x", "z"] and view["z"] == "l3"
    with pytest.raises(TypeError):
        view["w"] = "l4"


def test_name_list():
    assert name_list(None) == ()
    assert name_list("hnc, distraction,") == ("hnc", "distraction")
    assert name_list(["a", "b, c", " "]) == ("a", "b", "c")
    assert training.scheme.scheme_list("a,b") == evaluators.base.evaluator_list("a,b") == ("a", "b")


def test_project_registries():
    assert set(training.TRAINING_SCHEMES.names()) == set(training.scheme_names()) >= {"distraction", "hnc"}
    assert training.TRAINING_SCHEMES.metadata("hnc")["settings"] is training.HNCConfig
    assert "pointing_game" in evaluators.EVALUATORS and evaluators.evaluator_names() == evaluators.EVALUATORS.names()
    assert models.MODEL_NAMES == models.MODELS.names() == tuple(models.GRAD_CAM_LAYER) == tuple(models.CLASSIFIER)
    assert models.GRAD_CAM_LAYER["vgg16"] == "relu5_3" and models.CLASSIFIER["cnn_lstm"] == "classifier"
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'; did you mean"):
        models.get_model("resnet5", 3)
    # The spec order of the former hand-written SOURCE_SPECS, then VOC and COCO.
    assert data_lib.SOURCE_SPECS == data_lib.sources.SOURCE_SPECS == (
        "digits", "mnist", "mnist32", "npz", "cifar10", "folder", "decoy_mnist", "clean_mnist", "celeba",
        "tfds:<name>", "mnist_clips", "digits_clips", "voc07", "coco14")
    with pytest.raises(ValueError, match=r"Unknown source spec 'tfds:'; valid specs: digits, mnist"):
        data_lib.get_source("tfds:", "train")
    with pytest.raises(ValueError, match=r"get_source\('voc07'\): unknown option\(s\) \['seed'\]; this spec takes "
                                         r"\['limit'\]"):
        data_lib.get_source("voc07", "test", "x", options={"seed": 1})
    with pytest.raises(ValueError, match="not resized"):
        data_lib.get_source("coco14", "val2014", "x", image_size=32)
