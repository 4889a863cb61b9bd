"""Per-example records of an evaluation: `RUN/<tag>.examples.npz` (tag: eval for --eval_split, eval_<split> for an
--extra_eval split) holds each example's label, prediction and confidence by index, with the step, split, dataset and
the checkpoint evaluated (within the run: ckpt-300, best/ckpt-200, average/ckpt-300; records older than it have none).
Written at the end of training and by research.evaluate; research.compare pairs two runs' records for McNemar's exact
test, which is only meaningful when both saw the same examples (same dataset, split and labels in the same order).
"""

import io
import zipfile

import numpy as np

from research import UserError, fs, metrics, run_dir

FIELDS = ("label", "prediction", "confidence", "step", "split", "dataset")


def write(model_dir, result, step, dataset_name, checkpoint=None):
    """Writes an evaluation.Result's per-example record of the run's `checkpoint` (default ckpt-`step`, what
    training evaluates); returns its path."""
    labels, predicted, confidence = np.asarray(result.per_example).T
    buffer = io.BytesIO()
    np.savez_compressed(buffer, label=labels.astype(np.int32), prediction=predicted.astype(np.int32),
                        confidence=confidence.astype(np.float32), step=step, split=result.split,
                        dataset=dataset_name, checkpoint=checkpoint or f"ckpt-{step}")
    return fs.write(run_dir.per_example_path(model_dir, result.tag), buffer.getvalue())


def read(path):
    """{label, prediction, confidence, step, split, dataset}; a damaged file is one error line."""
    try:
        with np.load(io.BytesIO(fs.read_bytes(path))) as arrays:
            record = {key: arrays[key] for key in FIELDS}
            record["checkpoint"] = arrays["checkpoint"].item() if "checkpoint" in arrays.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a per-example evaluation record (damaged, or of another version): evaluate "
                        "the run again to rewrite it") from None
    record.update({key: record[key].item() for key in ("step", "split", "dataset")})
    return record


def paired_test(names, model_dirs):
    """A line with McNemar's exact test between two runs' final --eval_split evaluations, or one saying why there
    is none."""
    records = []
    for name, model_dir in zip(names, model_dirs):
        path = run_dir.per_example_path(model_dir, "eval")
        if not fs.exists(path):
            return f"no paired test: {name} has no {path.rsplit('/', 1)[-1]} (research.evaluate writes it)"
        records.append(read(path))
    a, b = records
    if (a["dataset"], a["split"]) != (b["dataset"], b["split"]) or not np.array_equal(a["label"], b["label"]):
        return (f"no paired test: the runs evaluated other examples ({a['dataset']} {a['split']}, {len(a['label'])} "
                f"vs {b['dataset']} {b['split']}, {len(b['label'])})")
    right_a, right_b = a["prediction"] == a["label"], b["prediction"] == b["label"]
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    p = metrics.mcnemar_exact(only_a, only_b)
    evaluated = [record["checkpoint"] for record in records]  # Named where one is not its step's own checkpoint.
    shown = "" if all(c in (None, f"ckpt-{r['step']}") for c, r in zip(evaluated, records)) else \
        f"; checkpoints {evaluated[0]} and {evaluated[1]}"
    return (f"McNemar's exact test on the same {len(a['label'])} {a['split']} examples (steps {a['step']} and "
            f"{b['step']}{shown}): right only in {names[0]} {only_a}, only in {names[1]} {only_b}, p = {p:.4g} "
            f"({'a' if p < 0.05 else 'no'} significant difference at 5%)")
