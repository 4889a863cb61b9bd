"""Evaluation of a model on every eval set of a run: `--eval_split`, which best/ is picked by, and each
`--extra_eval` split, all at every evaluation (big_vision's `config.evals`: a minival carved from training, val, a
second test set).

One tf.function pass per set, inside `strategy.run`, returns sums that are added over replicas: the cross-entropy,
the confusion matrix, the top-5 hits, the calibration bins (examples, confidence and correct predictions per
confidence bin) and each example's (label, prediction, confidence) filed at its index, so that three numbers per
example, never the logits, leave the replicas and the result is the same for any number of them. research/metrics.py
turns the sums into the reported numbers; the per-example record (research/per_example.py) is what McNemar's test
between two runs (research.compare) and the most-confident-mistakes grid read.
"""

import collections
import dataclasses
import re

import numpy as np
import tensorflow as tf

from research import UserError, config as config_lib, data, fs, metrics, optim, per_example, plots, run_dir

SUM = tf.distribute.ReduceOp.SUM
TTA = ("none", "flip", "five_crop")  # Test-time augmentations (predictor).
MISTAKES_SHOWN = 25  # The most confident mistakes shown of each evaluation.


@config_lib.checks
def _check_flags(config):
    for split in config.extra_eval:
        config_lib.need(split.strip(), f"--extra_eval={','.join(config.extra_eval)} has an empty split name")
    named = [config.eval_split, *config.extra_eval]
    twice = sorted({s for s in named if named.count(s) > 1})
    config_lib.need(not twice, f"--extra_eval names {', '.join(twice)} twice (--eval_split is evaluated anyway)")
    tags = [tag_of(s) for s in config.extra_eval]
    clash = sorted({s for s, t in zip(config.extra_eval, tags) if tags.count(t) > 1})
    config_lib.need(not clash, f"--extra_eval splits {', '.join(clash)} would share one TensorBoard run "
                               f"({tag_of(clash[0]) if clash else ''}); name them apart")


def tag_of(split):
    """The TensorBoard run (a directory name) of an extra eval split: 'train[:2%]' -> 'eval_train_2pct'."""
    return "eval_" + re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]", "_", split.replace("%", "pct"))).strip("_")


Result = collections.namedtuple("Result", "split tag scalars details confusion bins per_example")
Result.__doc__ = """One eval set's evaluation: `scalars` as metrics.jsonl holds them, `details` the per-class table
and averages, `per_example` [N, 3] (label, prediction, confidence) by example index."""


class Unreadable(UserError):
    """An eval example that cannot be read or decoded: `what` names it, `advice` says how to find or mend it."""

    def __init__(self, what, advice):
        super().__init__(f"{what}; {advice}")
        self.what, self.advice = what, advice


class Evaluator:
    """Evaluates `model` on each eval set of `dataset` (main first, `config.eval_split`, named `main_tag`: 'eval' for
    the run's own --eval_split); `evaluate()` -> [Result]. Built once per run or tool: the distributed datasets and
    traced passes are reused at every evaluation."""

    def __init__(self, strategy, model, dataset, config, main_tag="eval", tta="none", crop=None):
        self.dataset, self.config = dataset, config
        self.predict = predictor(model, tta, crop)  # (For pictures: the passes below build their own.)
        self.sets = [(config.eval_split, main_tag, dataset)] + [
            (split, tag_of(split), dataclasses.replace(dataset, eval=source, extra_eval=()))
            for split, source in dataset.extra_eval]
        self.passes = [(make_pass(strategy, model, dataset.num_classes, len(ds.eval), tta, crop),
                        strategy.distribute_datasets_from_function(data.eval_input_fn(ds, config)))
                       for _, _, ds in self.sets]

    def evaluate(self):
        """Every set once; an unreadable example raises Unreadable naming it (and an extra set's split)."""
        results = []
        for (split, tag, dataset), (run_pass, inputs) in zip(self.sets, self.passes):
            try:
                sums = {k: v.numpy() for k, v in run_pass(inputs).items()}
            except data.READ_ERRORS:
                bad = data.unreadable_eval_example(dataset)
                if bad is None:
                    raise
                raise Unreadable(f"cannot read eval example {bad}" + (f" of --extra_eval={split}" if results else ""),
                                 dataset.eval.advice) from None
            scalars, details = metrics.summarize(sums, dataset.class_names)
            results.append(Result(split, tag, {"split": split, **scalars}, details, sums["confusion"], sums["bins"],
                                  sums["per_example"]))
        return results

    def dataset_of(self, result):
        return next(ds for split, _, ds in self.sets if split == result.split)

    def mistakes_figure(self, result):
        """The most confident mistakes of an evaluation, as the Keras tutorial's prediction grid (captioned with the
        evaluation's own prediction and confidence)."""
        labels, predicted, confidence = result.per_example.T
        wrong = np.flatnonzero(predicted != labels)
        shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:MISTAKES_SHOWN]
        dataset = self.dataset_of(result)
        inputs, shown_labels = data.eval_examples(dataset, self.config, shown)
        probabilities = np.zeros([len(shown), dataset.num_classes])
        probabilities[np.arange(len(shown)), predicted[shown].astype(int)] = confidence[shown]
        return plots.predictions(np.asarray(dataset.preprocessing.for_display(inputs)), shown_labels, probabilities,
                                 dataset.class_names, title=f"{result.split}: the {len(shown)} most confident of "
                                                            f"{len(wrong)} mistakes")


def predictor(model, tta="none", crop=None):
    """`predict(images)` -> the model's logits, or with test-time augmentation the log of the mean of the class
    probabilities of several views of each image (whose softmax is that mean): 'flip' the image and its mirror
    image; 'five_crop' the four corner and the centre `crop` (height, width) boxes of images larger than that
    (torchvision's FiveCrop: research/evaluate.py feeds it images resized to crop / --eval_crop_fraction)."""

    def logits_of(images):
        return tf.cast(model(images, training=False), tf.float32)

    def views(images):
        if tta == "flip":
            return [images, tf.image.flip_left_right(images)]
        (height, width), (h, w) = images.shape[1:3], crop
        corners = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w),
                   ((height - h) // 2, (width - w) // 2)]
        return [images[:, top:top + h, left:left + w] for top, left in corners]

    def predict(images):
        if tta == "none":
            return logits_of(images)
        probabilities = [tf.nn.softmax(logits_of(view)) for view in views(images)]
        return tf.math.log(tf.add_n(probabilities) / len(probabilities))

    return predict


def make_pass(strategy, model, num_classes, num_examples, tta="none", crop=None):
    """`run_pass(distributed eval dataset)` -> the sums of one pass over every example (see the module docstring),
    of the model's predictions with test-time augmentation `tta` (predictor)."""
    predict = predictor(model, tta, crop)

    def replica_eval(images, labels, indices):
        logits = predict(images)
        probabilities = tf.nn.softmax(logits)
        confidence, predicted = tf.reduce_max(probabilities, -1), tf.argmax(logits, -1)
        correct = tf.cast(tf.equal(predicted, labels), tf.float32)
        ece_bin = tf.minimum(tf.cast(tf.floor(confidence * metrics.ECE_BINS), tf.int32), metrics.ECE_BINS - 1)
        per_example = tf.stack([tf.cast(labels, tf.float32), tf.cast(predicted, tf.float32), confidence], 1)
        return {
            "loss": tf.reduce_sum(optim.per_example_loss(labels, logits)),
            "confusion": tf.math.confusion_matrix(labels, predicted, num_classes, dtype=tf.float32),
            "top_k": tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k=min(metrics.TOP_K, num_classes)),
                                           tf.float32)),
            "bins": tf.math.unsorted_segment_sum(tf.stack([tf.ones_like(confidence), confidence, correct], 1),
                                                 ece_bin, metrics.ECE_BINS),
            "per_example": tf.scatter_nd(indices[:, None], per_example, [num_examples, 3]),
        }

    @tf.function
    def run_pass(dist_dataset):
        sums = {"loss": tf.constant(0.0), "confusion": tf.zeros([num_classes, num_classes]),
                "top_k": tf.constant(0.0), "bins": tf.zeros([metrics.ECE_BINS, 3]),
                "per_example": tf.zeros([num_examples, 3])}
        for batch in dist_dataset:
            replica_sums = strategy.run(replica_eval, args=batch)
            sums = {k: v + strategy.reduce(SUM, replica_sums[k], axis=None) for k, v in sums.items()}
        return sums

    return run_pass


def summary_line(result):
    """'test: loss 0.1234 accuracy 0.9812 [0.9784, 0.9837] top-5 ... ECE 0.0123 (10000 examples)'."""
    scalars = result.scalars
    top5 = f" top-5 {scalars['top5_accuracy']:.4f}" if "top5_accuracy" in scalars else ""
    return (f"{result.split}: loss {scalars['loss']:.4f} accuracy {metrics.interval_text(scalars)}{top5} "
            f"ECE {scalars['ece']:.4f} ({scalars['examples']} examples)")


def results_fields(results):
    """results.json's fields of a run's final evaluation (Evaluator.evaluate's Results, --eval_split first): its
    numbers and per-class table, its confusion matrix, each extra set's; None for a run that never evaluated
    (--eval_every=never), until `research.evaluate --follow` evaluates its last checkpoint and fills them in."""
    if not results:
        return {"eval": None, "confusion_matrix": None, "extra_eval": None}
    main, *extra = results
    return {"eval": {**main.scalars, **main.details}, "confusion_matrix": main.confusion.astype(int).tolist(),
            "extra_eval": {r.split: {**r.scalars, **r.details, "confusion_matrix": r.confusion.astype(int).tolist()}
                           for r in extra}}


def write_final_records(model_dir, results, step, dataset_name, figures=True):
    """What the final evaluation writes beside results.json (training's own, or a --follow sidecar's of the last
    checkpoint): each set's per-example record and, with `figures` (the run's --eval_figures), the learning curves
    (without, an earlier segment's curves.png is removed: it would be stale)."""
    for result in results:
        per_example.write(model_dir, result, step, dataset_name)
    if figures:
        plots.write_curves(model_dir)
    else:
        fs.remove(fs.join(model_dir, run_dir.CURVES_FILE))
