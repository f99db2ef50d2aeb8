r"""Faithfulness of every saliency method on a trained run, as an evaluator: ``"faithfulness"``.

For ``examples`` test images (spread evenly over the test split, the same for every arm), each method of
``methods`` explains the class the trained model predicts (:func:`saliency_jax.saliency.saliency_map` of its
registry method, unnormalised: :data:`FAITHFULNESS_METHODS`), and :mod:`saliency_jax.evaluation.faithfulness`
scores the maps:

* **deletion** and **insertion** AUC (Petsiuk et al., BMVC 2018, Sec. 4.1): the predicted class's probability as
  the most salient pixels are removed (replaced by ``deletion_substrate``) or inserted into a blurred canvas; lower
  deletion AUC and higher insertion AUC are more faithful.
* **cascading model-parameter randomisation** (Adebayo et al., NeurIPS 2018, Sec. 3.1): the layers
  ``randomization_layers`` (default: every top-level module with parameters, from the logits down) are
  re-initialised one after the other (from the model's own initialiser, key ``seed + 1``) and the maps recomputed;
  the Spearman rank correlation of ``|map|`` with the trained model's map after each step. A method that depends on
  what the model learnt falls towards 0; one that stays high is an edge detector, not an explanation.
* **relevance mass accuracy** (Arras et al., Information Fusion 2022, Sec. 4.2): the fraction of the map's positive
  mass inside the known region, on test splits whose items carry a ``"region"`` mask (Decoy MNIST, CelebA with
  templates); None elsewhere.

Three more, each off by default (``road``, ``infidelity``, ``sensitivity``):

* **ROAD** (Rong et al., ICML 2022): the predicted class's probability after imputing (noisy linear imputation, the
  authors' noise 0.01) the fractions ``road_fractions`` of the pixels, most relevant first (MoRF, lower is better)
  and least relevant first (LeRF, higher is better); the headline is pytorch-grad-cam's ``ROADCombined``,
  ``(mean LeRF change - mean MoRF change) / 2`` (higher is better).
  :func:`saliency_jax.evaluation.remove_and_debias.road`, key 0.
* **infidelity** (Yeh et al., NeurIPS 2019, Definition 2.1; Captum's ``infidelity``): the squared error between the
  map's prediction of the predicted class's logit change and the change itself, under ``perturb_samples`` Gaussian
  perturbations of std ``infidelity_std`` (Captum's documented 0.003) subtracted from the image; the map is used for
  every channel and rescaled by Captum's ``normalize=True`` least-squares factor, since the methods' maps come in
  different units. Lower is better.
* **max-sensitivity** (Yeh et al. 2019, Definition 3.1; Captum's ``sensitivity_max``): the largest relative change
  ``||map(x + u) - map(x)|| / ||map(x)||`` over ``perturb_samples`` uniform perturbations of radius
  ``sensitivity_radius`` (Captum's 0.02), explaining the same class. Lower is more stable.

Every computation is batched over the examples and jitted; the deletion / insertion curves of all examples run in
:func:`jax.lax.map` chunks, the randomisation steps in one :func:`jax.lax.map`. The maps and scores of a method are
compiled once per process for each (model, method, layer, metric settings, shapes): every arm and repeat after the
first reuses them. The randomisation test is compiled for each run: the model's batch statistics are constants of
its program, as when the recorded results (tests/test_recorded.py) were computed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saliency_jax import data as data_lib
from saliency_jax.models.build import model_layers
from saliency_jax.evaluation import faithfulness as F
from saliency_jax.evaluation import infidelity_sensitivity as I
from saliency_jax.evaluation import remove_and_debias as R
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, linen_module,
                                          register_evaluator)
from saliency_jax.saliency import METHODS, linen_view, saliency_map

__all__ = ["FAITHFULNESS_METHODS", "FaithfulnessSettings", "faithfulness_evaluator", "method_maps_fn",
           "evaluate_faithfulness"]

#: The methods the evaluator offers: its name -> ``(key of saliency.METHODS, options)``; the maps are
#: :func:`~saliency_jax.saliency.saliency_map` of that method with those options on ``linen_view(module, variables,
#: layer, train=False)``, not normalised (only their order and positive mass are used). RISE draws its masks from
#: ``jax.random.key(0)``.
FAITHFULNESS_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient": ("vanilla_gradient", {}),
    "grad_cam": ("grad_cam", {}),
    "excitation_backprop": ("excitation_backprop", {}),
    "contrastive_excitation_backprop": ("contrastive_excitation_backprop", {}),
    "rise": ("rise", {"num_masks": 500, "grid_size": 7}),
    "lrp_epsilon": ("lrp_epsilon", {}),
    "lrp_alpha_beta": ("lrp_alpha_beta", {}),
    "lrp_zplus": ("lrp_zplus", {}),
    "grad_cam_plus_plus": ("grad_cam_plus_plus", {}),
    "hirescam": ("hirescam", {}),
    "layer_cam": ("layer_cam", {}),
    "xgrad_cam": ("xgrad_cam", {}),
    "eigen_cam": ("eigen_cam", {}),
    "score_cam": ("score_cam", {}),
    "occlusion": ("occlusion", {"sliding_window_shapes": (4, 4), "strides": (2, 2)}),
}
#: The methods that explain a layer (:class:`FaithfulnessSettings` ``layers``); the others take the pixels.
_LAYER_METHODS = tuple(m for m, (name, _) in FAITHFULNESS_METHODS.items()
                       if METHODS[name].layer.startswith("spatial layer"))
_RISE_SEED = 0
#: Key of ROAD's noise and of the infidelity / sensitivity perturbations (the same for every arm and method).
_METRIC_SEED = 0
_LABELS = {"gradient": "gradient", "grad_cam": "Grad-CAM", "excitation_backprop": "EB",
           "contrastive_excitation_backprop": "cEB", "rise": "RISE", "lrp_epsilon": "LRP-eps",
           "lrp_alpha_beta": "LRP-a2b1", "lrp_zplus": "LRP-z+", "grad_cam_plus_plus": "Grad-CAM++",
           "hirescam": "HiResCAM", "layer_cam": "LayerCAM", "xgrad_cam": "XGrad-CAM", "eigen_cam": "Eigen-CAM",
           "score_cam": "Score-CAM", "occlusion": "occlusion"}


@dataclasses.dataclass(frozen=True)
class FaithfulnessSettings(EvaluatorSettings):
    """Settings of the ``"faithfulness"`` evaluator.

    Attributes:
      methods: methods to score (keys of :data:`FAITHFULNESS_METHODS`).
      layers: ``{method: layer path}`` for the layer methods (default: the run's Grad-CAM layer,
        ``config.model.grad_cam_layer`` or the architecture's).
      examples: test images scored (spread evenly over the test split; all when 0 or more than the split).
      deletion_substrate: what deleted pixels become (a number; 0.0 = black, the reference code's zeros).
      insertion_substrate: the canvas of insertion: ``"blur"`` (the paper's) or a number.
      pixels_per_step: pixels changed per deletion / insertion step (0: the image width, as the paper).
      randomization: run the cascading randomisation test.
      randomization_layers: module paths re-initialised in order, top (logits) first; empty: every top-level
        module with parameters, last-defined first.
      randomization_examples: images of the randomisation test (the first of ``examples``; it recomputes every map
        once per layer).
      road: run ROAD (MoRF and LeRF with noisy linear imputation).
      road_fractions: fractions of the pixels removed by ROAD, each in [0, 1).
      infidelity: compute infidelity (Captum's, normalised).
      sensitivity: compute max-sensitivity (recomputes every map ``perturb_samples`` times).
      perturb_samples: perturbations per image of infidelity and max-sensitivity (Captum's default 10).
      infidelity_std: standard deviation of infidelity's Gaussian perturbations (image units).
      sensitivity_radius: half-width of max-sensitivity's uniform perturbations (image units).
    """

    methods: tuple[str, ...] = ("gradient", "grad_cam", "excitation_backprop", "contrastive_excitation_backprop")
    layers: Any = dataclasses.field(default_factory=dict)
    examples: int = 256
    deletion_substrate: float = 0.0
    insertion_substrate: Any = "blur"
    pixels_per_step: int = 0
    randomization: bool = True
    randomization_layers: tuple[str, ...] = ()
    randomization_examples: int = 64
    road: bool = False
    road_fractions: tuple[float, ...] = R.ROAD_FRACTIONS
    infidelity: bool = False
    sensitivity: bool = False
    perturb_samples: int = 10
    infidelity_std: float = 0.003
    sensitivity_radius: float = 0.02

    def __post_init__(self):
        methods = tuple(self.methods) if not isinstance(self.methods, str) else tuple(
            m.strip() for m in self.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in FAITHFULNESS_METHODS]
        if unknown or not methods:
            raise ValueError(f"faithfulness.methods must name some of {tuple(FAITHFULNESS_METHODS)}; got "
                             f"{self.methods!r}")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "layers", dict(self.layers or {}))
        extra = [k for k in self.layers if k not in _LAYER_METHODS]
        if extra:
            raise ValueError(f"faithfulness.layers: {extra} are not layer methods ({_LAYER_METHODS})")
        if int(self.examples) < 0 or int(self.randomization_examples) < 1 or int(self.pixels_per_step) < 0:
            raise ValueError("faithfulness: examples must be >= 0, randomization_examples >= 1, pixels_per_step >= 0")
        if not (self.insertion_substrate == "blur" or isinstance(self.insertion_substrate, (int, float))):
            raise ValueError(f"faithfulness.insertion_substrate must be 'blur' or a number; got "
                             f"{self.insertion_substrate!r}")
        fractions = tuple(self.road_fractions)
        if not fractions or not all(isinstance(f, (int, float)) and 0 <= f < 1 for f in fractions):
            raise ValueError(f"faithfulness.road_fractions must be numbers in [0, 1); got {self.road_fractions!r}")
        object.__setattr__(self, "road_fractions", tuple(float(f) for f in fractions))
        if int(self.perturb_samples) < 1 or not self.infidelity_std > 0 or not self.sensitivity_radius > 0:
            raise ValueError("faithfulness: perturb_samples must be >= 1, infidelity_std and sensitivity_radius > 0")


def method_maps_fn(module, method: str, layer: str | None) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """One method's maps: :func:`~saliency_jax.saliency.saliency_map` through a linen view (not jitted).

    Args:
      module: the linen model (``apply(variables, images, train=False) -> logits``).
      method: a key of :data:`FAITHFULNESS_METHODS`.
      layer: the method's layer path (ignored by the input-space methods).

    Returns:
      ``(variables, images [batch, height, width, channels], targets int [batch]) -> maps [batch, height, width]``
      float32 at the image resolution, not normalised.

    Raises:
      ValueError: an unknown method.
    """
    if method not in FAITHFULNESS_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(FAITHFULNESS_METHODS)}")
    name, options = FAITHFULNESS_METHODS[method]
    layer = layer if method in _LAYER_METHODS else None

    def maps(variables, images, targets):
        key = jax.random.key(_RISE_SEED) if METHODS[name].needs_key else None
        view = linen_view(module, variables, layer, train=False)
        return saliency_map(name, view, images, targets, normalize=False, key=key, **options).astype(jnp.float32)

    return maps


def _default_layers(params: Any) -> tuple[str, ...]:
    return tuple(reversed([k for k in params if jax.tree.leaves(params[k])]))


def _nanmean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


class _Metrics(NamedTuple):
    """The settings the jitted scores depend on (hashable: the static argument of :func:`_scores`)."""

    deletion_substrate: float
    insertion_substrate: Any
    pixels_per_step: int | None
    road: bool
    road_fractions: tuple[float, ...]
    infidelity: bool
    sensitivity: bool
    perturb_samples: int
    infidelity_std: float
    sensitivity_radius: float

    @classmethod
    def of(cls, settings: FaithfulnessSettings) -> "_Metrics":
        return cls(float(settings.deletion_substrate), settings.insertion_substrate,
                   int(settings.pixels_per_step) or None, bool(settings.road), tuple(settings.road_fractions),
                   bool(settings.infidelity), bool(settings.sensitivity), int(settings.perturb_samples),
                   float(settings.infidelity_std), float(settings.sensitivity_radius))


# The jitted computations take the module, method, layer and metric settings as static arguments, so they are
# traced and compiled once per process for each (model, method, layer, settings, shapes): every arm of an experiment
# and every repeat reuses the first one's compilations.
@functools.partial(jax.jit, static_argnames=("module",))
def _predicted_classes(variables, images, *, module):
    return jnp.argmax(module.apply(variables, images, train=False), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module",))
def _initial_params(key, images, *, module):
    return module.init(key, images, train=False)["params"]


@functools.partial(jax.jit, static_argnames=("module", "method", "layer", "metrics"))
def _scores(variables, images, targets, *, module, method: str, layer: str | None, metrics: _Metrics):
    maps_fn = method_maps_fn(module, method, layer)
    maps = maps_fn(variables, images, targets)
    f = functools.partial(module.apply, variables, train=False)
    dele = F.deletion(f, images, maps, targets, substrate=metrics.deletion_substrate,
                      pixels_per_step=metrics.pixels_per_step)
    ins = F.insertion(f, images, maps, targets, substrate=metrics.insertion_substrate,
                      pixels_per_step=metrics.pixels_per_step)
    extra = {}
    if metrics.road or metrics.infidelity or metrics.sensitivity:
        road_key, infidelity_key, sensitivity_key = jax.random.split(jax.random.key(_METRIC_SEED), 3)
    if metrics.road:
        extra["road"] = R.road(f, images, maps, targets, key=road_key, fractions=metrics.road_fractions)
    if metrics.infidelity:
        noise = I.gaussian_perturbations(infidelity_key, images, metrics.perturb_samples, std=metrics.infidelity_std)
        extra["infidelity"] = I.infidelity(f, images, maps, targets, perturbations=noise, normalize=True)
    if metrics.sensitivity:
        shifts = I.uniform_perturbations(sensitivity_key, images, metrics.perturb_samples,
                                         radius=metrics.sensitivity_radius)
        extra["sensitivity_max"] = I.sensitivity_max(lambda x, t: maps_fn(variables, x, t), images, targets,
                                                     perturbations=shifts)
    return maps, dele.auc, ins.auc, extra


def evaluate_faithfulness(module, variables: Any, images: np.ndarray, settings: FaithfulnessSettings, *,
                          layers: dict[str, str], regions: np.ndarray | None = None, random_params: Any = None,
                          ) -> dict[str, dict[str, Any]]:
    """The faithfulness metrics of every method of ``settings`` on one batch.

    Args:
      module: the linen model (``apply(variables, images, train=False) -> logits``).
      variables: its ``{"params", "batch_stats"}``.
      images: [n, height, width, channels] float32 in [0, 1].
      settings: the evaluator's settings.
      layers: ``{method: layer path}`` of the layer methods.
      regions: [n, height, width] {0, 1} known regions, or None.
      random_params: re-initialised parameters (same tree as ``variables["params"]``) for the randomisation test.

    Returns:
      ``{method: {"deletion_auc", "insertion_auc": mean over images, "relevance_mass": mean or None,
      "randomization": {"layers": [...], "spearman_abs": [mean per step], "spearman": [...]} or absent,
      "road": {"fractions", "morf", "lerf": [mean per fraction], "morf_average", "lerf_average", "combined"} or
      absent, "infidelity", "sensitivity_max": mean or absent,
      "per_image": {"deletion_auc": [n], "insertion_auc": [n], and "road_combined", "infidelity",
      "sensitivity_max": [n] where computed}}}``; the predicted classes are explained.
    """
    images = jnp.asarray(images, jnp.float32)
    targets = _predicted_classes(variables, images, module=module)
    metrics = _Metrics.of(settings)
    out = {}
    for method in settings.methods:
        layer = layers.get(method) if method in _LAYER_METHODS else None
        maps, dele, ins, extra = _scores(variables, images, targets, module=module, method=method, layer=layer,
                                         metrics=metrics)
        record = {"deletion_auc": float(jnp.mean(dele)), "insertion_auc": float(jnp.mean(ins)),
                  "relevance_mass": None,
                  "per_image": {"deletion_auc": np.asarray(dele).tolist(), "insertion_auc": np.asarray(ins).tolist()}}
        if "road" in extra:
            road = extra["road"]
            record["road"] = {"fractions": list(settings.road_fractions),
                              "morf": np.mean(np.asarray(road.morf), 0).tolist(),
                              "lerf": np.mean(np.asarray(road.lerf), 0).tolist(),
                              "morf_average": float(jnp.mean(road.morf_average)),
                              "lerf_average": float(jnp.mean(road.lerf_average)),
                              "combined": float(jnp.mean(road.combined))}
            record["per_image"]["road_combined"] = np.asarray(road.combined).tolist()
        for name in ("infidelity", "sensitivity_max"):
            if name in extra:
                record[name] = float(jnp.mean(extra[name]))
                record["per_image"][name] = np.asarray(extra[name]).tolist()
        if regions is not None:
            record["relevance_mass"] = _nanmean(F.relevance_mass_accuracy(maps, jnp.asarray(regions)))
        if settings.randomization and random_params is not None:
            rand_layers = tuple(settings.randomization_layers) or _default_layers(variables["params"])
            n = min(int(settings.randomization_examples), images.shape[0])
            state = {k: v for k, v in variables.items() if k != "params"}
            # Jitted per call with the model's non-parameter variables (batch statistics) as constants of the
            # program, as the results recorded before the cached programs were computed (tests/test_recorded.py):
            # as arguments, the Spearman correlations move at the 1e-7 level.
            maps_fn = method_maps_fn(module, method, layer)
            result = jax.jit(lambda p, r, x, t: F.model_randomization(
                lambda q, xx, tt: maps_fn({"params": q, **state}, xx, tt), p, r, rand_layers, x, t,
                ssim_window=None))(variables["params"], random_params, images[:n], targets[:n])
            record["randomization"] = {
                "layers": list(rand_layers),
                "spearman_abs": [_nanmean(row) for row in np.asarray(result.spearman_abs)],
                "spearman": [_nanmean(row) for row in np.asarray(result.spearman)]}
        out[method] = record
    return out


@register_evaluator("faithfulness", FaithfulnessSettings)
def faithfulness_evaluator(settings: FaithfulnessSettings) -> Evaluator:
    """Deletion / insertion AUC, cascading randomisation and relevance mass of every method (module docstring)."""

    def evaluate(run, data):
        source = data.test_source(run.config)
        n = len(source) if not settings.examples else min(int(settings.examples), len(source))
        if not n:
            return {}
        idx = np.linspace(0, len(source) - 1, n).astype(int)
        size = run.config.dataset.get("image_size")
        batch = next(iter(data_lib.make_eval_batches(source, idx, batch_size=n, image_size=size)))
        images = batch["image"][:n]
        regions = batch["region"][:n] if "region" in batch else None
        if regions is not None and regions.ndim != 3:
            regions = None  # several regions per image (templates per attribute): not one known region
        module = linen_module(run, "the faithfulness evaluator")
        grad_cam_layer = model_layers(run.config).grad_cam_layer
        layers = {m: settings.layers.get(m) or grad_cam_layer for m in _LAYER_METHODS}
        random_params = None
        if settings.randomization:
            shape = jnp.zeros((1, *images.shape[1:]), jnp.float32)
            random_params = _initial_params(jax.random.key(int(run.config.seed) + 1), shape, module=module)
        metrics = evaluate_faithfulness(module, run.variables, images, settings, layers=layers, regions=regions,
                                        random_params=random_params)
        return {"examples": int(n), "layers": layers, "methods": metrics}

    def report(ctx: ReportContext) -> Section | None:
        per_arm = ctx.metrics("faithfulness")
        if not per_arm:
            return None

        def cell(values, fmt=".3f"):
            values = [v for v in values if v is not None]
            if not values:
                return "n/a"
            if len(values) == 1:
                return f"{values[0]:{fmt}}"
            return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}"

        lines = []
        first = next(iter(per_arm.values()))[0]
        lines.append(f"On {first.get('examples', '?')} test images, explaining the predicted class. Deletion AUC "
                     "(lower is more faithful) and insertion AUC (higher) of Petsiuk et al. 2018; rank correlation "
                     "(Spearman, |map|) with the trained model's map once every layer is re-initialised (Adebayo "
                     "et al. 2018; lower means the map depends on the learnt weights); relevance mass inside the "
                     "known region (n/a: the data has none). Mean ± sample std over repeats.")
        records = [m for runs in per_arm.values() for r in runs for m in r.get("methods", {}).values()]
        extras = [(key, title) for key, title in (("road", "ROAD (LeRF − MoRF) / 2 ↑"), ("infidelity", "infidelity ↓"),
                                                  ("sensitivity_max", "max-sensitivity ↓"))
                  if any(key in m for m in records)]
        if extras:
            lines[-1] += (" ROAD: pytorch-grad-cam's ROADCombined of Rong et al. 2022 (noisy linear imputation); "
                          "infidelity (Captum's, normalised) and max-sensitivity of Yeh et al. 2019.")
        lines += ["", "| arm | method | deletion AUC ↓ | insertion AUC ↑ | rank corr. after randomisation ↓ | "
                      "relevance mass ↑ |" + "".join(f" {title} |" for _, title in extras),
                  "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(extras)]
        for arm, runs in per_arm.items():
            for method in settings.methods:
                rows = [r["methods"][method] for r in runs if method in r.get("methods", {})]
                if not rows:
                    continue
                rand = [r["randomization"]["spearman_abs"][-1] for r in rows if r.get("randomization")]
                more = [[(r[key]["combined"] if key == "road" else r[key]) for r in rows if key in r]
                        for key, _ in extras]
                lines.append(f"| {arm} | {_LABELS.get(method, method)} | {cell([r['deletion_auc'] for r in rows])} | "
                             f"{cell([r['insertion_auc'] for r in rows])} | {cell(rand)} | "
                             f"{cell([r['relevance_mass'] for r in rows])} |" + "".join(
                                 f" {cell(v, '.2e' if key == 'infidelity' else '.3f')} |"
                                 for v, (key, _) in zip(more, extras)))
        cascades = {arm: runs[0]["methods"] for arm, runs in per_arm.items()}
        arm0, methods0 = next(iter(cascades.items()))
        cascade = {m: r["randomization"] for m, r in methods0.items() if r.get("randomization")}
        if cascade:
            layers = next(iter(cascade.values()))["layers"]
            lines += ["", f"Cascading randomisation, arm {arm0} (first repeat): rank correlation (|map|) after "
                          "re-initialising the layers up to each column, from the logits down.", "",
                      "| method | " + " | ".join(f"+{name}" for name in layers) + " |",
                      "| --- |" + " --- |" * len(layers)]
            for m, r in cascade.items():
                lines.append(f"| {_LABELS.get(m, m)} | " + " | ".join("n/a" if v is None else f"{v:.3f}"
                                                                     for v in r["spearman_abs"]) + " |")
        return Section("Faithfulness of the saliency maps", "\n".join(lines))

    return Evaluator(evaluate, report)
