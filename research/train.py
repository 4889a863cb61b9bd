"""Train and evaluate an image classifier: `python -m research.train --flagfile=configs/cnn.cfg --model_dir=runs/x`.

The program only: flags in, one run (research/trainer.py's `train_and_evaluate`), an exit status out. Running the
same command again resumes from the run directory's latest checkpoint; a finished run says so and exits 0.
"""

import sys

from research import cli, config as config_lib  # Standard library and absl only: they run before TensorFlow loads.

if __name__ == "__main__":
    cli.start()
    cli.parse_flags(sys.argv, __doc__, known_only=True)  # The flags known so far: bad values fail at once.
    if config_lib.FLAGS.is_parsed():  # (Not after --help, which is answered later, with every flag.)
        cli.before_tensorflow(cli.check_lasting, config_lib.FLAGS.model_dir, "--model_dir")

import tensorflow as tf  # noqa: E402

from research import distribute, trainer  # noqa: E402


def main(argv):
    """`python -m research.train FLAGS`: a mistake is one error line and exit status 2; a run stopped by a signal
    exits 128 + its number, after saving."""
    cli.parse_flags(argv, __doc__)
    return cli.run(_train_from_flags)


def _train_from_flags(_):
    try:
        trainer.train_and_evaluate(config_lib.config_from_flags())
    except trainer.Preempted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except tf.errors.UnavailableError as e:
        message = distribute.lost_worker_message(e)  # Multi-worker: another worker died or stopped answering.
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
