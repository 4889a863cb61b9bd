"""Average the weights of several checkpoints of a run (timm's avg_checkpoints.py):
`python -m research.average --model_dir=RUN --last=N` (the N newest kept checkpoints) or `--best=N` (the N kept
checkpoints of the highest --eval_split accuracy in metrics.jsonl).

Every float variable of the model is averaged -- weights and batch-norm statistics alike, as timm does -- and for a
run with --ema_decay the moving averages are what is averaged (what its evaluations use); integer state (dropout
seed generators) is the newest checkpoint's. The result is a checkpoint of the run's own layout, `RUN/average/ckpt-S`
(S: the newest averaged step), with `average.json` naming what went into it; research.evaluate, research.export and
research.predict read it with `--checkpoint=RUN/average`. The run's own checkpoints are only read, so a running
training is not disturbed (its checkpoint manager never looks into average/).
"""

import sys

from research import cli, fs

PARSER = cli.Parser(prog="python -m research.average", description=__doc__.split("\n\n")[0])
PARSER.add_argument("--model_dir", required=True, help="The run directory.")
WHICH = PARSER.add_mutually_exclusive_group(required=True)
WHICH.add_argument("--last", type=int, metavar="N", help="Average the N newest kept checkpoints.")
WHICH.add_argument("--best", type=int, metavar="N", help="Average the N kept checkpoints of the highest eval accuracy.")

if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    cli.check_model_dir(cli.parse_args(PARSER).model_dir)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import UserError, checkpoint as checkpoint_lib, run_dir, runs  # noqa: E402

AVERAGE_DIR = "average"


def chosen_checkpoints(model_dir, config, last=None, best=None):
    """The checkpoint prefixes to average, newest first: the `last` newest, or the `best` of highest accuracy."""
    count = last if last is not None else best
    flag = "--last" if last is not None else "--best"
    if count is None or count < 1:
        raise UserError(f"{flag} must be a positive number of checkpoints, got {count}")
    kept = checkpoint_lib.candidates(model_dir)
    if last is not None:
        chosen = kept[:last]
    else:
        accuracy = {line["step"]: line["accuracy"] for line in run_dir.read_metrics(model_dir)
                    if line.get("split", config.eval_split) == config.eval_split and "accuracy" in line}
        evaluated = [path for path in kept if runs.checkpoint_step(path) in accuracy]
        chosen = sorted(evaluated, key=lambda path: -accuracy[runs.checkpoint_step(path)])[:best]
        kept = evaluated
    if len(chosen) < count:
        what = "kept checkpoints" if last is not None else f"kept checkpoints evaluated on {config.eval_split}"
        raise UserError(f"{flag}={count}: {model_dir} has only {len(kept)} {what}")
    return sorted(chosen, key=runs.checkpoint_step, reverse=True)


def average(model_dir, last=None, best=None):
    """Writes the averaged checkpoint; returns (its path, the checkpoints averaged)."""
    config = runs.read_config(model_dir)
    model = runs.build_model(config, runs.read_dataset_info(model_dir))
    paths = chosen_checkpoints(model_dir, config, last, best)
    states = []
    for path in paths:  # The weights evaluation uses: for an --ema_decay run, the moving averages.
        checkpoint_lib.restore_weights(model, path, average=bool(config.ema_decay))
        states.append([v.numpy() for v in model.variables])
    for variable, values in zip(model.variables, zip(*states)):
        floating = np.issubdtype(values[0].dtype, np.floating)
        variable.assign(np.mean(values, axis=0, dtype=np.float64).astype(values[0].dtype) if floating else values[0])
    ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables] if config.ema_decay else []
    output = fs.join(model_dir, AVERAGE_DIR)
    saved = tf.train.CheckpointManager(
        tf.train.Checkpoint(model_variables=checkpoint_lib.model_state(model), ema=ema), output, max_to_keep=1,
    ).save(checkpoint_number=runs.checkpoint_step(paths[0]))
    fs.write_json(fs.join(output, "average.json"), {
        "checkpoint": saved, "averaged": paths, "how": f"last {last}" if last is not None else f"best {best}"})
    return saved, paths


def _main(argv):
    args = PARSER.parse_args(argv)
    saved, paths = average(args.model_dir, args.last, args.best)
    print(f"wrote {saved}: the average of {len(paths)} checkpoints ({', '.join(p.rsplit('/', 1)[-1] for p in paths)});"
          f" evaluate it with --checkpoint={fs.join(args.model_dir, AVERAGE_DIR)}")


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
