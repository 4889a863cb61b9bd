"""Figures of a run: learning curves, confusion matrix, reliability diagram, labelled image grids.

Shared by TensorBoard (research/reporting.py turns a figure into an image summary through `to_png`) and
research/evaluate.py (PNG files in the run directory), so both show the same pictures. Figures are built with
matplotlib's object-oriented API (`matplotlib.figure.Figure` rendered by Agg), never pyplot: no global figure
registry to leak from a long training process, and no display needed on a headless machine.
"""

import io
import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from research import UserError, fs, metrics, run_dir

CORRECT_COLOR, WRONG_COLOR = "tab:blue", "tab:red"
ANNOTATE_MAX_CLASSES = 20  # Above this the counts of a confusion matrix no longer fit in its cells.
TICKS_MAX_CLASSES = 40


def to_png(figure, dpi=100):
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def curves(records):
    """Train and eval accuracy and loss over steps, from `run_dir.read_metrics` records (train_* are the means of
    the loop of steps before each evaluation)."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    steps = [r["step"] for r in records]
    for ax, metric in zip(figure.subplots(1, 2), ("accuracy", "loss")):
        train = [r.get(f"train_{metric}", np.nan) for r in records]
        ax.plot(steps, train, "o-", color="tab:orange", label=f"train {metric}")
        ax.plot(steps, [r[metric] for r in records], "o-", color=CORRECT_COLOR, label=f"eval {metric}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def write_curves(model_dir):
    """`model_dir/curves.png` from its metrics.jsonl; returns its path. For the end of training and evaluate."""
    records = run_dir.read_metrics(model_dir)
    if not records:
        raise UserError(f"{model_dir} has no evaluations in {run_dir.METRICS_FILE} yet: no curves to draw")
    return fs.save_figure(curves(records), fs.join(model_dir, run_dir.CURVES_FILE))


def confusion(matrix, class_names):
    """The [true, predicted] count matrix, coloured by the share of each true class, counts written in the cells
    when there are few classes."""
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * num_classes + 2), 24)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    ax = figure.subplots()
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=ax, label="share of the true class", shrink=0.8)
    total = matrix.sum()
    ax.set_title(f"{int(total)} examples, accuracy {np.trace(matrix) / max(total, 1):.4f}")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= TICKS_MAX_CLASSES:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, [str(n)[:12] for n in class_names], rotation=90 if num_classes > 10 else 45,
                      ha="center" if num_classes > 10 else "right", fontsize=8)
        ax.set_yticks(ticks, [str(n)[:12] for n in class_names], fontsize=8)
    if num_classes <= ANNOTATE_MAX_CLASSES:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, f"{int(count)}", ha="center", va="center", fontsize=7,
                        color="white" if rates[row, col] > 0.5 else "black")
    return figure


def reliability(bins, split):
    """The reliability diagram of [bins, 3] sums (examples, confidence, correct) per confidence bin
    (research/evaluation.py): each bin's accuracy against the diagonal of perfect calibration, the bars' gap to it
    weighted by the share of examples being the expected calibration error, and how many examples each bin holds."""
    bins = np.asarray(bins, np.float64)
    count = bins[:, 0]
    edges = np.linspace(0, 1, len(bins) + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1 / len(bins)
    filled = count > 0  # Empty bins have no accuracy to draw.
    accuracy, confidence = bins[filled, 2] / count[filled], bins[filled, 1] / count[filled]
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax, counts = figure.subplots(1, 2)
    ax.bar(centers[filled], accuracy, width=width, edgecolor="black", color=CORRECT_COLOR, label="accuracy")
    ax.bar(centers[filled], confidence - accuracy, bottom=accuracy, width=width, color=WRONG_COLOR, alpha=0.4,
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{split}: ECE {metrics.calibration(bins):.4f} ({int(count.sum())} examples, {len(bins)} bins)")
    ax.legend(loc="upper left")
    counts.bar(centers, count, width=width, edgecolor="black", color="tab:gray")
    counts.set(xlim=(0, 1), xlabel="confidence", ylabel="examples", yscale="log" if count.max() > 0 else "linear",
               title="examples per bin")
    return figure


def image_grid(images, captions, colors=None, title=None):
    """Images ([N, H, W, C], uint8 or float in [0, 1]) in a near-square grid, each with a caption below. Drawn as one
    mosaic in one Axes: a subplot per image made each grid cost ~1 s of the training process, this ~0.3 s."""
    images = np.asarray(images)
    count = len(images)
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    height, width = images.shape[1:3] if count else (28, 28)
    gap = max(1, height // 8)
    cell_height, cell_width = height + 3 * gap, width + gap  # Room under each image for its caption.
    mosaic = np.ones((rows * cell_height, columns * cell_width, 3), np.float32)
    figure = Figure(figsize=(1.7 * columns, 1.9 * rows + (0.4 if title else 0)), layout="constrained")
    if title:
        figure.suptitle(title)
    ax = figure.subplots()
    ax.set_axis_off()
    for i in range(count):
        image = images[i].astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        top, left = i // columns * cell_height, i % columns * cell_width
        mosaic[top:top + height, left:left + width] = np.clip(image, 0, 1)  # Grey images broadcast to RGB.
        ax.text(left + width / 2, top + height + 0.3 * gap, captions[i], ha="center", va="top", fontsize=8,
                color=colors[i] if colors else "black")
    ax.imshow(mosaic, interpolation="nearest")
    if not count:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    return figure


def predictions(images, labels, probabilities, class_names, title=None):
    """The Keras tutorial's grid: each image captioned "predicted confidence% (true)", red when wrong."""
    predicted = np.argmax(probabilities, axis=-1)
    captions = [f"{class_names[p]} {100 * probs[p]:.0f}% ({class_names[t]})"
                for p, probs, t in zip(predicted, probabilities, labels)]
    colors = [CORRECT_COLOR if p == t else WRONG_COLOR for p, t in zip(predicted, labels)]
    return image_grid(images, captions, colors, title)
