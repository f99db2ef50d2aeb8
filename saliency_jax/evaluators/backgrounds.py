"""The MNIST background protocol of Cruz & Cardoso as an evaluator (``"backgrounds"``): Table 1 shape.

Cruz & Cardoso, "Training a CNN to be background invariant" (poster; ICPR 2020), Table 1: accuracy on the clean test
set and on six copies whose pixels outside a 2-pixel dilation of the digit are replaced by a fixed binary pattern
(stripes, checkerboard, border, circles, clock, random salt-and-pepper;
:mod:`saliency_jax.evaluation.backgrounds` builds them as the authors' ``mybackgrounds.py`` does). Works on any
trained run whose test images have a zero background (the ``mnist32`` source: digits zero-padded to 32x32), whatever
trained it; the report has one row per arm (mean ± sample std over repeats, in %), the paper's rows if the settings
list them, the contact sheet of the seven test sets, and the figures a run left in its workdir (the background-
invariance trainer's ``masks.png`` and ``backgrounds_along_training.png``, first repeat of each arm).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from saliency_jax import data as data_lib
from saliency_jax.evaluation import backgrounds as bg
from saliency_jax.evaluators.base import (Evaluator, EvaluatorSettings, ReportContext, Section, register_evaluator,
                                          run_model)

__all__ = ["BackgroundsSettings", "backgrounds_evaluator", "test_arrays", "backgrounds_table"]

RUN_FIGURES = (("masks.png", "learned masks and generated backgrounds, final weights"),
               ("backgrounds_along_training.png", "phase-3 inputs along training (Fig. 4)"))
"""Figures a run may leave in its workdir that the report links (file, caption)."""


@dataclasses.dataclass(frozen=True)
class BackgroundsSettings(EvaluatorSettings):
    """Settings of the ``"backgrounds"`` evaluator.

    Attributes:
      examples: test images evaluated (the first ones of the split); 0: all (10,000 for MNIST).
      batch_size: images per jitted call (each call runs the model on 7 x batch_size images).
      sets: the test sets, from :data:`saliency_jax.evaluation.backgrounds.TEST_SET_NAMES` (Table 1's columns).
      contact_examples: test images in the contact sheet (0: no sheet).
      reference: rows to print beside the measured ones, ``((name, (accuracy in % per set, ...)), ...)`` - e.g. the
        paper's Table 1; each row lists one number per set of ``sets``.
    """

    examples: int = 0
    batch_size: int = 500
    sets: tuple[str, ...] = bg.TEST_SET_NAMES
    contact_examples: int = 8
    reference: tuple = ()

    def __post_init__(self):
        unknown = [s for s in self.sets if s not in bg.TEST_SET_NAMES]
        if unknown or not self.sets:
            raise ValueError(f"sets must be a non-empty subset of {bg.TEST_SET_NAMES}; got {self.sets}")
        if int(self.examples) < 0 or int(self.batch_size) < 1 or int(self.contact_examples) < 0:
            raise ValueError(f"examples and contact_examples must be >= 0 and batch_size >= 1; got {self.examples}, "
                             f"{self.contact_examples}, {self.batch_size}")
        for row in self.reference:
            if len(row) != 2 or len(row[1]) != len(self.sets):
                raise ValueError(f"each reference row must be (name, {len(self.sets)} numbers); got {row!r}")


def test_arrays(source, config, examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, h, w, c] float32 in [0, 1], labels [n] int32)``: the first ``examples`` (0: all) test images,
    resized as ``config.dataset.image_size`` says."""
    n = len(source) if not examples else min(int(examples), len(source))
    images, labels = [], []
    for batch in data_lib.make_eval_batches(source, np.arange(n), batch_size=min(n, 1000),
                                            image_size=config.dataset.get("image_size")):
        keep = np.asarray(batch["mask"]).astype(bool)
        images.append(np.asarray(batch["image"], np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def backgrounds_table(metrics: dict[str, list[dict[str, float]]], sets=bg.TEST_SET_NAMES, reference=()) -> str:
    """A Markdown table, one row per arm, one column per test set (accuracy in %, mean ± sample std over repeats),
    then a column of the mean over the background sets; ``reference`` rows (name, numbers in %) follow in italics."""
    backgrounds = [s for s in sets if s != "clean"]
    head = list(sets) + (["mean of backgrounds"] if backgrounds else [])
    lines = ["| arm | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for arm, runs in metrics.items():
        cells = [_cell([r[s] for r in runs]) for s in sets]
        if backgrounds:
            cells.append(_cell([float(np.mean([r[s] for s in backgrounds])) for r in runs]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for name, values in reference:
        cells = [f"{float(v):.1f}" for v in values]
        if backgrounds:
            cells.append(f"{np.mean([float(v) for s, v in zip(sets, values) if s != 'clean']):.1f}")
        lines.append(f"| *{name}* | " + " | ".join(f"*{c}*" for c in cells) + " |")
    return "\n".join(lines)


@register_evaluator("backgrounds", BackgroundsSettings)
def backgrounds_evaluator(settings: BackgroundsSettings) -> Evaluator:
    """Accuracy of a trained run on the clean test set and under each fixed background (Table 1 shape)."""
    sets = tuple(settings.sets)

    def evaluate(run, data):
        config = run.config
        source = data.test_source(config)
        ds = config.dataset
        images, labels = data.cached(("background_test_arrays", ds.name, ds.get("data_dir"), ds.get("image_size"),
                                      settings.examples), lambda: test_arrays(source, config, settings.examples))
        model, variables = run_model(run), run.variables
        accuracy = bg.evaluate_backgrounds(lambda x: model.apply(variables, x), images, labels,
                                           batch_size=settings.batch_size, names=sets)
        return {**accuracy, "examples": int(len(images))}

    def report(ctx: ReportContext) -> Section:
        metrics = ctx.metrics("backgrounds")
        n = {r["examples"] for runs in metrics.values() for r in runs}
        lines = [f"Accuracy (%) on the clean test set and with every pixel outside a 2-pixel dilation of the digit "
                 f"replaced by a fixed binary background (Cruz & Cardoso, Table 1), {'/'.join(map(str, sorted(n)))} "
                 "test images; mean ± sample std over repeats.", "",
                 backgrounds_table(metrics, sets, settings.reference)]
        first_arm = ctx.arms[0]
        config = ctx.runs[first_arm][0].config
        if settings.contact_examples:
            source = data_lib.get_source(config.dataset.name, "test", data_dir=config.dataset.get("data_dir"),
                                         image_size=config.dataset.get("image_size"))
            images, labels = test_arrays(source, config, settings.contact_examples)
            path = bg.background_contact_sheet(images, ctx.workdir / "background_test_sets.png",
                                               labels=[str(int(y)) for y in labels], names=sets,
                                               title="The test sets: clean and six fixed backgrounds")
            lines += ["", f"![The seven test sets]({path.name})"]
        for arm in ctx.arms:
            run = ctx.runs[arm][0]
            for name, caption in RUN_FIGURES:
                if (run.workdir / name).exists():
                    rel = (run.workdir / name).relative_to(ctx.workdir) if run.workdir.is_relative_to(ctx.workdir) \
                        else run.workdir / name
                    lines += ["", f"{arm} (seed {run.seed}), {caption}:", "", f"![{arm}: {caption}]({rel})"]
        return Section("Background invariance (Table 1 shape)", "\n".join(lines))

    return Evaluator(evaluate, report)
