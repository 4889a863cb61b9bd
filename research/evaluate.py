"""Evaluate a run's checkpoint on every example of its eval sets:
`python -m research.evaluate --model_dir=RUN [--checkpoint=latest|best|all|PATH] [--split=test]
[--tta=flip|five_crop] [--image_size=N] [--predictions=FILE.csv]`, or every checkpoint of a training run as it
appears: `python -m research.evaluate --model_dir=RUN --follow` (research/follow.py).

Prints, for the run's --eval_split and each --extra_eval split (or only --split where given), the exact accuracy with
its 95% Wilson interval, the loss (the negative log-likelihood), the expected calibration error (15 bins) and the
macro/weighted F1, then the first set's per-class precision, recall and F1 and its confusion matrix; writes into the
run directory report.json (all of it), confusion_matrix.png, reliability.png (the reliability diagram),
mistakes.png (the most confident mistakes), predictions.png (the first images with predicted class, confidence and
true class, red when wrong), curves.png (the run's learning curves so far) and, for a checkpoint of the run itself,
each set's per-example record (<tag>.examples.npz: label, prediction, confidence, which checkpoint), which
`research.compare A B` pairs for McNemar's test.
A run directory it cannot write (read-only, full) still gets the numbers printed, then one error line (exit status
2).

The numbers are computed by research.train's own evaluation function over research.data's own eval pipeline,
with the run's flags (--data_dir / --tfds_manual_dir / --dataset=folder:NEW_PLACE override the recorded ones, for
data that moved), so evaluating the checkpoint of a training evaluation reproduces that evaluation exactly. (The model
computes in float32: a --mixed_precision run's own evaluations differ by their half-precision rounding.)
`--checkpoint=all` evaluates every checkpoint the run keeps, oldest first, one line each; the files are the newest's.
`--tta=five_crop` evaluates the four corner and the centre crops at the model's input size C of each image resized to
C / --eval_crop_fraction (the run's, 0.875 unless set: 32 x 32 for 28, 256 for 224), averaging their class
probabilities (torchvision's FiveCrop, the standard multi-crop evaluation); with --image_size=N the crops are N.
"""

import csv
import dataclasses
import io
import posixpath
import sys

from research import UserError, cli, fs

PARSER = cli.run_tool_parser("python -m research.evaluate", __doc__)
PARSER.add_argument("--split", help="TFDS split to evaluate on (default: the run's --eval_split).")
cli.add_data_location(PARSER)
PARSER.add_argument("--tta", choices=("none", "flip", "five_crop"), default="none",
                    help="Test-time augmentation: flip averages the class probabilities of each image and its mirror "
                         "image (left-right); five_crop those of its four corner and centre crops at the model's "
                         "input size C, taken from the image resized to C / the run's --eval_crop_fraction (0.875 "
                         "unless set: 32 x 32 for 28).")
PARSER.add_argument("--image_size", type=int, metavar="N",
                    help="Evaluate at N x N pixels instead of the training size (test-time resolution), for models "
                         "whose weights do not depend on it (resnets: global pooling).")
PARSER.add_argument("--predictions", metavar="PATH.csv",
                    help="Also write one CSV row per example of the first set: index, example (file or record), "
                         "label, prediction, probability of the prediction.")

PARSER.add_argument("--follow", action="store_true",
                    help="Evaluate each checkpoint of a run trained with --eval_every=never as it appears, writing "
                         "the records training's own evaluation would (metrics.jsonl, best/, TensorBoard's eval "
                         "runs), until the run finishes; it may start before the training (research/follow.py).")
PARSER.add_argument("--poll_s", type=float, default=10.0, metavar="S",
                    help="--follow: look for a new checkpoint every S seconds.")
PARSER.add_argument("--timeout_s", type=float, default=3600.0, metavar="S",
                    help="--follow: give up (one error line, exit status 2) when no training has been running in "
                         "the run directory (no live LOCK) and no checkpoint has been left to evaluate for S "
                         "seconds: it died or has not started.")
FOLLOW_ONLY = ("poll_s", "timeout_s")
NOT_WITH_FOLLOW = ("checkpoint", "split", "tta", "image_size", "predictions")  # It evaluates as training would.


def check_args(args):
    """The combinations argparse cannot check: one UserError line (before TensorFlow loads)."""
    given = [name for name in (NOT_WITH_FOLLOW if args.follow else FOLLOW_ONLY)
             if getattr(args, name) != PARSER.get_default(name)]
    if given and args.follow:
        raise UserError(f"--follow evaluates every checkpoint as the training's own evaluation would: it takes no "
                        f"{', '.join('--' + name for name in given)}")
    if given:
        raise UserError(f"{', '.join('--' + name for name in given)} only with --follow")
    if not 0 <= args.poll_s < float("inf"):
        raise UserError(f"--poll_s must be a number of seconds >= 0, got {args.poll_s}")
    if not args.timeout_s >= 0:  # (inf: wait for ever.)
        raise UserError(f"--timeout_s must be a number of seconds >= 0 (or inf), got {args.timeout_s}")


if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    ARGS = cli.parse_args(PARSER)
    cli.before_tensorflow(check_args, ARGS)
    cli.before_tensorflow(cli.check_lasting, ARGS.predictions, "--predictions")
    if ARGS.follow:  # A sidecar is another process: it never sees a run in a training's memory (ram://).
        cli.before_tensorflow(cli.check_lasting, ARGS.model_dir, "--model_dir")
    else:  # (A sidecar may start before its training has created the run directory.)
        cli.check_model_dir(ARGS.model_dir)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import data, evaluation, follow, metrics, per_example, plots, run_dir, runs  # noqa: E402

PREDICTIONS_SHOWN = 25
PRINTED_MATRIX_MAX_CLASSES = 20  # A bigger confusion matrix is only drawn, not printed.
SCORES = ("precision", "recall", "f1")  # The per-class table's columns.


def evaluate(model_dir, checkpoint="latest", split=None, data_dir=None, tfds_manual_dir=None, dataset=None,
             tta="none", predictions=None, image_size=None):
    """Evaluates and writes the report files; returns the report dict (also model_dir/report.json). `data_dir`,
    `tfds_manual_dir` and `dataset` say where the run's data is now (runs.data_location)."""
    if predictions == "" or predictions and fs.isdir(predictions):  # Said before the work, not after it.
        raise UserError(f"--predictions={predictions} is {'a directory' if predictions else 'empty'}: give a file "
                        "name such as predictions.csv")
    if predictions and not predictions.endswith(".csv") and _in_a_run(predictions):
        raise UserError(f"--predictions={predictions} is inside a run directory but not named .csv: a run's own "
                        "files (flags.txt, best/best.json, ...) are never overwritten; name it predictions.csv")
    overrides = runs.data_location(model_dir, data_dir=data_dir, tfds_manual_dir=tfds_manual_dir, dataset=dataset)
    restored = runs.load_model(model_dir, checkpoint, **overrides)
    if image_size is not None:
        restored = _at_size(restored, image_size)
        overrides["image_size"] = str(image_size)
    read_as, crop = (_five_crop_view(restored, overrides), restored.dataset.image_shape[:2]) if tta == "five_crop" \
        else (restored, None)
    model, info = restored.model, restored.dataset
    if split == "":
        raise UserError("--split is empty: give a split such as test or 'train[90%:]'")
    # No training split: evaluation neither reads the training data nor depends on it being there.
    sets = {"train_split": None} if split is None else {"train_split": None, "eval_split": split, "extra_eval": ""}
    config = runs.read_config(model_dir, **overrides, **sets)
    try:
        dataset = runs.load_dataset(model_dir, read_as, **overrides, **sets)
    except UserError as e:  # It names the training flag that --split stands in for.
        raise UserError(str(e).replace(f"--eval_split={split}", f"--split={split}")) from None

    evaluator = evaluation.Evaluator(tf.distribute.get_strategy(), model, dataset, config, "eval" if split in (
        None, restored.config.eval_split) else evaluation.tag_of(split), tta, crop)  # (Whose records the files are.)
    main, *extra = evaluator.evaluate()
    report = {"model_dir": model_dir, "checkpoint": restored.checkpoint, "step": restored.step, "tta": tta,
              "image_size": list(info.image_shape[:2]),
              **({"view_size": list(dataset.image_shape[:2])} if crop else {}),
              **main.scalars,
              **main.details, "confusion_matrix": main.confusion.astype(np.int64).tolist(),
              "extra_eval": {r.split: {**r.scalars, **r.details} for r in extra}}

    report["files"] = []
    try:  # A run directory that cannot be written (read-only, full) still gets its numbers printed.
        report["files"] = _write_files(model_dir, report, restored, dataset, config, evaluator, (main, *extra),
                                       predictions)
    except UserError as e:
        report["not_written"] = str(e)
    return report


def _write_files(model_dir, report, restored, dataset, config, evaluator, results, predictions):
    """The figures, per-example records, --predictions file and report.json; returns their paths."""
    main, info = results[0], restored.dataset
    inputs, labels = data.eval_examples(dataset, config, range(min(PREDICTIONS_SHOWN, len(dataset.eval))))
    probabilities = tf.nn.softmax(evaluator.predict(inputs)).numpy()
    images = np.asarray(dataset.preprocessing.for_display(inputs))
    figures = {run_dir.CONFUSION_FILE: plots.confusion(main.confusion, info.class_names),
               run_dir.RELIABILITY_FILE: plots.reliability(main.bins, main.split),
               run_dir.MISTAKES_FILE: evaluator.mistakes_figure(main),
               run_dir.PREDICTIONS_FILE: plots.predictions(images, labels, probabilities, info.class_names,
                                                           title=f"{main.split}: first {len(images)} examples")}
    files = [fs.save_figure(figure, fs.join(model_dir, name)) for name, figure in figures.items()]
    within = posixpath.relpath(restored.checkpoint, model_dir)  # ckpt-300, best/ckpt-200, average/ckpt-300
    if not within.startswith(".."):  # Another run's checkpoint: its predictions are no record of this run.
        files += [per_example.write(model_dir, result, restored.step, info.name, within) for result in results]
    if predictions:
        files.append(_write_predictions(predictions, main, dataset))
    if run_dir.read_metrics(model_dir):  # None before the run's first evaluation.
        files.append(plots.write_curves(model_dir))
    path = fs.join(model_dir, run_dir.REPORT_FILE)
    fs.write_json(path, {**report, "files": files + [path]})
    return files + [path]


def format_report(report):
    """The report as the lines printed: each set's totals, the first set's per-class table and (for few classes)
    its confusion matrix."""
    lines = [f"{report['checkpoint']} (step {report['step']}) on split {report['split']}: accuracy "
             f"{metrics.interval_text(report)} ({sum(c['correct'] for c in report['per_class'])}/"
             f"{report['examples']}, 95% Wilson interval), loss (NLL) {report['loss']:.4f}"
             + (f", top-5 accuracy {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else "")
             + f", ECE {report['ece']:.4f}"]
    lines += [f"  also {split}: accuracy {metrics.interval_text(extra)}, loss (NLL) {extra['loss']:.4f}, ECE "
              f"{extra['ece']:.4f} ({extra['examples']} examples)" for split, extra in report["extra_eval"].items()]
    lines += ["", f"{'class':>5}  {'name':<16} {'precision':>9} {'recall':>8} {'F1':>8} {'examples':>8}"]
    lines += [_table_row(c["class"], c["name"], [c[key] for key in SCORES], c["examples"]) for c in report["per_class"]]
    lines += [_table_row("", f"{average} average", [report[f"{average}_{key}"] for key in SCORES], report["examples"])
              for average in ("macro", "weighted")]
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


def _at_size(restored, size):
    """`restored` with its model rebuilt for size x size inputs and given the same weights."""
    if not 0 < size <= 4096:
        raise UserError(f"--image_size must be in [1, 4096], got {size}")
    info = restored.dataset
    info = dataclasses.replace(info, image_shape=(size, size, info.image_shape[2]), preprocessing=dataclasses.replace(
        info.preprocessing, image_size=(size, size)))
    try:
        model = runs.build_model(restored.config, info)
    except ValueError as e:
        raise UserError(f"--image_size={size}: --model={restored.config.model} does not take {size}x{size} images "
                        f"({str(e).splitlines()[0][:150]})") from None
    for target, source in zip(model.variables, restored.model.variables):
        if target.shape != source.shape:
            raise UserError(f"--image_size={size}: --model={restored.config.model}'s weights depend on the input "
                            f"size ({source.path}: {source.shape.as_list()} at {restored.dataset.image_shape[0]}, "
                            f"{target.shape.as_list()} at {size})")
        target.assign(source)
    return restored._replace(model=model, dataset=info)


def _five_crop_view(restored, overrides):
    """`restored` as --tta=five_crop reads its data: at the model's input size / --eval_crop_fraction (the run's),
    each image resized whole to it or, for a run whose evaluation crops (--augment=random_resized_crop), its shorter
    side resized to it and the central square kept, so that the centre crop is that evaluation's own crop.
    `overrides` (the run's flags a tool changes) gains what reads the data so."""
    info, fraction = restored.dataset, restored.config.eval_crop_fraction
    height, width = info.image_shape[:2]
    view = int(height / fraction + 1e-9)
    if height != width or view == height:
        raise UserError(f"--tta=five_crop needs a square model input and room for corner crops: {height}x{width} "
                        f"at --eval_crop_fraction={fraction}")
    overrides.update(image_size=str(view), eval_crop_fraction="1.0")
    return restored._replace(dataset=dataclasses.replace(info, image_shape=(view, view, info.image_shape[2])))


def _in_a_run(path):
    """Whether `path` lies inside a run directory (in it or below it, as best/ is)."""
    directory = posixpath.dirname(path) or "."
    while directory and not run_dir.is_run(directory):
        parent = posixpath.dirname(directory)
        directory = parent if parent != directory else ""
    return bool(directory)


def _write_predictions(path, result, dataset):
    """One CSV row per example of `result`'s set: where it is, its label, the prediction and its probability."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "example", "label", "prediction", "probability"])
    names = dataset.class_names
    for index, (label, predicted, confidence) in enumerate(result.per_example):
        writer.writerow([index, dataset.eval.name_of(index), names[int(label)], names[int(predicted)],
                         f"{confidence:.6f}"])
    return fs.write(path, out.getvalue())


def _table_row(number, name, scores, examples):
    cells = " ".join(f"{'-' if v is None else format(v, '.4f'):>{width}}" for v, width in zip(scores, (9, 8, 8)))
    return f"{number:>5}  {str(name)[:16]:<16} {cells} {examples:>8}"


def _main(argv):
    args = PARSER.parse_args(argv)
    check_args(args)
    if args.follow:
        follow.follow(args.model_dir, args.poll_s, args.timeout_s, data_dir=args.data_dir,
                      tfds_manual_dir=args.tfds_manual_dir, dataset=args.dataset)
        return 0
    # Oldest first, so that the files left are the newest checkpoint's.
    checkpoints = runs.checkpoint_paths(args.model_dir)[::-1] if args.checkpoint == "all" else [args.checkpoint]
    for checkpoint in checkpoints:
        report = evaluate(args.model_dir, checkpoint, args.split, args.data_dir, args.tfds_manual_dir, args.dataset,
                          args.tta, args.predictions, args.image_size)
        if len(checkpoints) > 1:
            print(format_report(report).split("\n")[0])
    if len(checkpoints) > 1:
        print()
    print(format_report(report))
    if "not_written" in report:
        print(f"error: {report['not_written']} (the report above is not saved)", file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(report['files'])}")


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
