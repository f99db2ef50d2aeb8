"""Command line: ``saliency-jax {train,experiment} --config=CONFIG.py[:ARG] --workdir=DIR [--config.FIELD=VALUE]``.

* ``train`` trains one model from the config with the trainer ``config.trainer`` names (resuming from ``workdir`` if
  it holds checkpoints), runs the evaluators of ``config.evaluators`` on it and prints their scalar metrics.
* ``experiment`` trains every arm x repeat of ``config.experiment`` with the same seeds, runs the evaluators on each
  run and writes ``report.md``, ``metrics.json`` and the figures into ``workdir``.

Configs are ``ml_collections`` files (``get_config(arg)``), so any field can be overridden on the command line,
e.g. ``--config.num_steps=100 --config.distraction.fill=one``; ``:runlocal`` after the path selects a config's tiny
variant. ``--multihost`` calls ``jax.distributed.initialize()`` first (TPU VM pods: run the same command on every
host). Also available as ``python -m saliency_jax``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "experiment")
_USAGE = ("usage: saliency-jax {train,experiment} --config=CONFIG.py[:ARG] --workdir=DIR "
          "[--config.FIELD=VALUE ...] [--multihost] [--noprogress]")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config), e.g. "
                                "experiments/configs/distraction_digits.py[:runlocal].", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, report); reruns resume from it.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-host TPU VMs / GPU clusters).")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def _run(command: str, argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}\n{_USAGE}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError(f"--config and --workdir are required\n{_USAGE}")
    import jax

    if not FLAGS["verbosity"].present:  # orbax and grain log every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.multihost:
        jax.distributed.initialize()
    logging.info("devices: %s", jax.devices())
    if command == "train":
        from saliency_jax import evaluators, experiment, trainers

        config = FLAGS.config
        experiment.check_config(config)
        trainer = trainers.get_trainer(config.get("trainer", "supervised"))
        result = trainer.train(config, FLAGS.workdir, progress=FLAGS.progress)
        record = experiment.evaluate_run(result, evaluators.build_evaluators(config),
                                         evaluators.ExperimentData(config))
        if jax.process_index() == 0:
            print(json.dumps({name: _scalars(m) for name, m in record.metrics.items()}, indent=2))
    else:
        from saliency_jax import experiment

        experiment.run_experiment(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        if jax.process_index() == 0:
            print(f"report: {FLAGS.workdir}/report.md")


def _scalars(metrics):
    """The top-level numbers of an evaluator's metrics (what ``train`` prints)."""
    if not isinstance(metrics, dict):
        return metrics
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv=None) -> None:
    """Entry point of the ``saliency-jax`` console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(_USAGE, file=sys.stderr)
        sys.exit(2)
    command = argv.pop(1)
    app.run(lambda a: _run(command, a), argv=argv)


if __name__ == "__main__":
    main()
