"""Evaluate a run's checkpoint on every example of a split:
`python -m research.evaluate --model_dir=RUN [--checkpoint=latest|best|PATH] [--split=test]`.

Prints the exact accuracy and loss, the accuracy of each class and the confusion matrix, and writes into the run
directory report.json (all of it), confusion_matrix.png, predictions.png (the first test images with predicted
class, confidence and true class, red when wrong) and curves.png (the run's learning curves so far). A run
directory it cannot write (read-only, full) still gets the numbers printed, then one error line (exit status 2).

The numbers are computed by research.train's own evaluation function over research.data's own eval pipeline,
with the run's flags (--data_dir / --tfds_manual_dir / --dataset=folder:NEW_PLACE override the recorded ones, for
data that moved), so evaluating the checkpoint of a training evaluation reproduces that evaluation exactly. (The model
computes in float32: a --mixed_precision run's own evaluations differ by their half-precision rounding.)
"""

import sys

from research import cli

PARSER = cli.run_tool_parser("python -m research.evaluate", __doc__)
PARSER.add_argument("--split", help="TFDS split to evaluate on (default: the run's --eval_split).")
cli.add_data_location(PARSER)

if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    cli.check_model_dir(cli.parse_args(PARSER).model_dir)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import UserError, data, plots, run_dir, runs, train_lib  # noqa: E402

PREDICTIONS_SHOWN = 25
PRINTED_MATRIX_MAX_CLASSES = 20  # A bigger confusion matrix is only drawn, not printed.


def evaluate(model_dir, checkpoint="latest", split=None, data_dir=None, tfds_manual_dir=None, dataset=None):
    """Evaluates and writes the report files; returns the report dict (also model_dir/report.json). `data_dir`,
    `tfds_manual_dir` and `dataset` say where the run's data is now (runs.data_location)."""
    overrides = runs.data_location(model_dir, data_dir=data_dir, tfds_manual_dir=tfds_manual_dir, dataset=dataset)
    restored = runs.load_model(model_dir, checkpoint, **overrides)
    config, model, info = restored.config, restored.model, restored.dataset
    if split == "":
        raise UserError("--split is empty: give a split such as test or 'train[90%:]'")
    split = split or config.eval_split
    # No training split: evaluation neither reads the training data nor depends on it being there.
    try:
        dataset = runs.load_dataset(model_dir, restored, **overrides, train_split=None, eval_split=split)
    except UserError as e:  # It names the training flag that --split stands in for.
        raise UserError(str(e).replace(f"--eval_split={split}", f"--split={split}")) from None

    strategy = tf.distribute.get_strategy()
    evaluation = train_lib.make_evaluate(strategy, model, dataset.num_classes)
    try:
        loss, confusion, top_k = (t.numpy() for t in evaluation(
            strategy.distribute_datasets_from_function(data.eval_input_fn(dataset, config))))
    except data.READ_ERRORS:
        bad = data.unreadable_eval_example(dataset)
        if bad is None:
            raise
        raise UserError(f"cannot read eval example {bad}; {dataset.eval.advice}") from None
    metrics = train_lib.summarize_eval(loss, confusion, top_k)
    confusion = confusion.astype(np.int64)
    correct = np.diag(confusion)
    per_class = confusion.sum(axis=1)
    report = {
        "model_dir": model_dir, "checkpoint": restored.checkpoint, "step": restored.step, "split": split,
        **metrics,
        "per_class": [{"class": i, "name": name, "examples": int(n), "correct": int(c),
                       "accuracy": float(c / n) if n else None}
                      for i, (name, n, c) in enumerate(zip(info.class_names, per_class, correct))],
        "confusion_matrix": confusion.tolist(),
    }

    report["files"] = []
    try:  # A run directory that cannot be written (read-only, full) still gets its numbers printed.
        report["files"] = _write_files(model_dir, report, model, dataset, config, info, split, confusion)
    except UserError as e:
        report["not_written"] = str(e)
    return report


def _write_files(model_dir, report, model, dataset, config, info, split, confusion):
    """The figures and report.json in the run directory; returns their paths."""
    inputs, labels = data.first_eval_examples(dataset, config, PREDICTIONS_SHOWN)
    probabilities = tf.nn.softmax(model(inputs, training=False)).numpy()
    images = np.asarray(dataset.preprocessing.for_display(inputs))
    files = [run_dir.save_figure(plots.confusion(confusion, info.class_names),
                                 run_dir.join(model_dir, run_dir.CONFUSION_FILE)),
             run_dir.save_figure(plots.predictions(images, labels, probabilities, info.class_names,
                                                   title=f"{split}: first {len(images)} examples"),
                                 run_dir.join(model_dir, run_dir.PREDICTIONS_FILE))]
    if run_dir.read_metrics(model_dir):  # None before the run's first evaluation.
        files.append(plots.write_curves(model_dir))
    path = run_dir.join(model_dir, run_dir.REPORT_FILE)
    run_dir.write_json(path, {**report, "files": files + [path]})
    return files + [path]


def format_report(report):
    """The report as the lines printed: totals, a per-class table and (for few classes) the confusion matrix."""
    lines = [f"{report['checkpoint']} (step {report['step']}) on split {report['split']}: "
             f"accuracy {report['accuracy']:.4f} ({sum(c['correct'] for c in report['per_class'])}/"
             f"{report['examples']}), loss {report['loss']:.4f}"
             + (f", top-5 accuracy {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""),
             "", f"{'class':>5}  {'name':<16} {'accuracy':>8} {'examples':>8}"]
    for c in report["per_class"]:
        accuracy = "-" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        lines.append(f"{c['class']:>5}  {str(c['name'])[:16]:<16} {accuracy:>8} {c['examples']:>8}")
    matrix = np.array(report["confusion_matrix"])
    lines.append("")
    if len(matrix) > PRINTED_MATRIX_MAX_CLASSES:
        lines.append(f"confusion matrix: {len(matrix)} classes, see {run_dir.CONFUSION_FILE}")
        return "\n".join(lines)
    width = max(len(str(matrix.max())), len(str(len(matrix) - 1))) + 1
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append(" " * 6 + "".join(f"{i:>{width}}" for i in range(len(matrix))))
    lines += [f"{i:>5} " + "".join(f"{n:>{width}}" for n in row) for i, row in enumerate(matrix)]
    return "\n".join(lines)


def _main(argv):
    args = PARSER.parse_args(argv)
    report = evaluate(args.model_dir, args.checkpoint, args.split, args.data_dir, args.tfds_manual_dir, args.dataset)
    print(format_report(report))
    if "not_written" in report:
        print(f"error: {report['not_written']} (the report above is not saved)", file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(report['files'])}")


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
