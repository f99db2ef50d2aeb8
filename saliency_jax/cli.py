"""Command line: ``saliency-jax {train,experiment} --config=CONFIG.py[:ARG] --workdir=DIR [--config.FIELD=VALUE]``.

* ``train`` trains one model from the config (resuming from ``workdir`` if it holds checkpoints) and prints its
  clean and Random-Erasing test metrics.
* ``experiment`` trains every arm of ``config.experiment.arms`` with the same seeds and writes ``report.md``,
  ``metrics.json`` and the figures into ``workdir``.

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
        from saliency_jax import experiment, train

        test = experiment.data_lib.get_source(FLAGS.config.dataset.name, "test",
                                              data_dir=FLAGS.config.dataset.get("data_dir"),
                                              image_size=FLAGS.config.dataset.get("image_size"))
        result = train.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        metrics = experiment.evaluate_arm(FLAGS.config, result, test)
        if jax.process_index() == 0:
            print(json.dumps({k: {m: metrics[k][m] for m in ("accuracy", "f1_macro", "f1_weighted")}
                              for k in ("clean", "erased")}, indent=2))
    elif FLAGS.config.experiment.get("runner", "") == "excitation_dropout":
        from saliency_jax import experiment_dropout

        experiment_dropout.run_dropout_experiment(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        if jax.process_index() == 0:
            print(f"report: {FLAGS.workdir}/report.md")
    else:
        from saliency_jax import experiment

        experiment.run_experiment(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        if jax.process_index() == 0:
            print(f"report: {FLAGS.workdir}/report.md")


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
