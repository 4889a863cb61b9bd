"""The numbers of an evaluation, from the sums its TensorFlow pass returns (research/evaluation.py): accuracy with its
95% Wilson interval, loss (the negative log-likelihood), top-5 accuracy, per-class precision, recall and F1 with
macro and weighted averages, and the expected calibration error; and McNemar's exact test between two models'
per-example correctness. NumPy and the standard library only, so that every figure can be checked by hand.

Why Wilson: the normal-approximation interval (p +- 1.96 sqrt(p(1-p)/n)) collapses to zero width at 0% or 100%
accuracy and leaves [0, 1] near them, exactly where small eval sets and good models sit; Wilson's score interval
does neither (Newcombe 1998). Why McNemar: two models evaluated on the same examples are paired, so their accuracies
differ significantly only through the examples on which exactly one of them is right.
"""

import math
from fractions import Fraction

import numpy as np

Z_95 = 1.959963984540054  # The standard normal's 97.5% quantile.
ECE_BINS = 15  # Confidence bins of the expected calibration error (Guo et al. 2017; uncertainty-baselines).
TOP_K = 5  # Top-5 accuracy is reported for datasets of more classes than this.


def wilson_interval(correct, total, z=Z_95):
    """(low, high) of the score interval for a proportion of `correct` successes in `total` trials."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (max(0.0, center - half), min(1.0, center + half))


def mcnemar_exact(only_a, only_b):
    """Two-sided p-value of McNemar's exact test: `only_a` examples right only by model A, `only_b` only by B; under
    the null each discordant example is a fair coin, so p = P(Binomial(n, 1/2) as far from n/2 as observed)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def ece_bin(confidence):
    """The calibration bin of each confidence in [0, 1] (1.0 falls in the last): NumPy's twin of the in-graph one."""
    return np.minimum(np.floor(np.asarray(confidence) * ECE_BINS).astype(np.int64), ECE_BINS - 1)


def calibration(bins):
    """Expected calibration error from [ECE_BINS, 3] sums (examples, confidence, correct) per bin: the
    example-weighted mean |accuracy - confidence| over the bins."""
    bins = np.asarray(bins, np.float64)
    return float(np.abs(bins[:, 2] - bins[:, 1]).sum() / max(bins[:, 0].sum(), 1))


def per_class(confusion, class_names):
    """Precision, recall and F1 of each class from the [true, predicted] count matrix (None where undefined: no
    example of the class, or none predicted as it), with their macro (mean over the classes where defined) and
    weighted (by the class's examples) averages."""
    confusion = np.asarray(confusion, np.int64)
    correct, true, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    rows = []
    for i, name in enumerate(class_names):
        precision = correct[i] / predicted[i] if predicted[i] else None
        recall = correct[i] / true[i] if true[i] else None
        f1 = 2 * correct[i] / (true[i] + predicted[i]) if true[i] + predicted[i] else None
        rows.append({"class": i, "name": name, "examples": int(true[i]), "correct": int(correct[i]),
                     "precision": _float(precision), "recall": _float(recall), "f1": _float(f1)})
    averages = {}
    for metric in ("precision", "recall", "f1"):
        defined = [(row[metric], row["examples"]) for row in rows if row[metric] is not None]
        averages[f"macro_{metric}"] = _float(np.mean([v for v, _ in defined])) if defined else None
        weight = sum(n for _, n in defined)
        averages[f"weighted_{metric}"] = _float(sum(v * n for v, n in defined) / weight) if weight else None
    return rows, averages


def _float(value):
    return None if value is None else float(value)


def summarize(sums, class_names):
    """(scalars, per-class rows) of one evaluation from its sums (research/evaluation.py): the scalars are what
    metrics.jsonl, TensorBoard and the console show; `examples` says what the interval is computed from."""
    confusion = np.asarray(sums["confusion"])
    examples = int(confusion.sum())
    correct = int(round(float(np.trace(confusion))))
    rows, averages = per_class(confusion, class_names)
    scalars = {"loss": float(sums["loss"] / examples), "accuracy": correct / examples,
               "accuracy_95": [round(v, 6) for v in wilson_interval(correct, examples)], "examples": examples,
               "ece": calibration(sums["bins"]), "macro_f1": averages["macro_f1"],
               "weighted_f1": averages["weighted_f1"]}
    if len(confusion) > TOP_K:
        scalars["top5_accuracy"] = float(sums["top_k"] / examples)
    return scalars, {"per_class": rows, **averages}


def interval_text(scalars):
    """'0.9812 [0.9784, 0.9837]': an accuracy with its 95% interval, as printed."""
    low, high = scalars["accuracy_95"]
    return f"{scalars['accuracy']:.4f} [{low:.4f}, {high:.4f}]"
