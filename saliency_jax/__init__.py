"""saliency_jax: saliency-guided training in JAX/Flax.

Subpackages (dependencies point one way, top to bottom):

* :mod:`saliency_jax.saliency` - pure saliency transforms (Grad-CAM, Excitation Backprop, ...).
* :mod:`saliency_jax.training` - training schemes built on them (distraction occlusion, ...).
* :mod:`saliency_jax.models` - Flax linen models whose layers are addressable by module path.
* :mod:`saliency_jax.data` - data sources and grain pipelines.
* :mod:`saliency_jax.evaluation` - metrics, robustness, figures, reports.
* :mod:`saliency_jax.train` - the generic jit + mesh train/eval loop; :mod:`saliency_jax.experiment` runs arms.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # ``saliency_jax.load(workdir)`` (saliency_jax/runs.py), imported on first use so that ``import saliency_jax``
    # stays light.
    if name == "load":
        from saliency_jax.runs import load

        return load
    raise AttributeError(f"module 'saliency_jax' has no attribute {name!r}")
