"""The run directory's schema: the names of its files, and the reading (defensive: any content is one error line)
and writing of the run records. The records are written through research/fs.py, whole, on any filesystem TensorFlow
writes (local paths and URLs: gs://, s3://, hdfs://, ram://); the checkpoints are TensorFlow's own
(research/checkpoint.py), the TensorBoard events the summary writers' (research/reporting.py), the LOCK
research/lock.py's, and a sweep's console logs launch/sweep.py's.

Layout (research/trainer.py writes it, the tools read it):
  flags.txt      the resolved flags, itself a valid --flagfile      dataset.json   image shape, classes, preprocessing
  data_files.json  the file lists of a --dataset=folder:PATH run
  metrics.jsonl  one JSON line per evaluation                       results.json   the final evaluation and totals
  flags_history.jsonl  the flags a resume changed (learning rate, length, ...), one line per such resume
  provenance.jsonl  one JSON line per start or resume: versions, git commit, host, devices, command (provenance.py)
  ckpt-N.*, checkpoint, best/ (best.json)    checkpoints (research/checkpoint.py)
  eval.examples.npz, eval_<split>.examples.npz  each example's label, prediction, confidence (per_example.py)
  train/, eval/, eval_<split>/  TensorBoard events   LOCK  the one writer (LOCK.follow: the one --follow sidecar)
  curves.png, report.json, ...  figures
"""

import contextlib
import json
import os
import posixpath
import time

from research import UserError, config as config_lib, fs


FLAGS_FILE = "flags.txt"
DATASET_FILE = "dataset.json"
DATA_FILES_FILE = "data_files.json"  # A folder dataset's file lists, so that a resume reads the same files.
METRICS_FILE = "metrics.jsonl"
FLAGS_HISTORY_FILE = "flags_history.jsonl"  # One line per resume that changed flags, at the step it resumed from.
RESULTS_FILE = "results.json"
PROVENANCE_FILE = "provenance.jsonl"
BEST_DIR = "best"
BEST_FILE = "best.json"
LOCK_FILE = "LOCK"
FOLLOW_LOCK_FILE = "LOCK.follow"  # The one research.evaluate --follow sidecar of the run (research/follow.py).
CURVES_FILE = "curves.png"
REPORT_FILE = "report.json"
CONFUSION_FILE = "confusion_matrix.png"
PREDICTIONS_FILE = "predictions.png"
RELIABILITY_FILE = "reliability.png"
MISTAKES_FILE = "mistakes.png"
SWEEP_FILE = "sweep.json"  # In a sweep root (launch/sweep.py), beside its runs...
COMPARE_FILE = "compare.png"  # ...and research.compare's plot of them.
LOG_FILE = "train.log"  # In each run of a sweep: its console output.


# ------------------------------------------------------------------------------------------------ The run's files
def is_run(path):
    """Whether `path` holds a run (research/trainer.py writes flags.txt before the first step)."""
    return fs.gfile().exists(fs.join(path, FLAGS_FILE))


def check_run(model_dir):
    """Fails with one line unless `model_dir` holds a run."""
    fs.check_filesystem(model_dir)
    if not fs.gfile().isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} " + ("is a file, not a run directory" if fs.gfile().exists(model_dir)
                                                      else "does not exist"))
    if not is_run(model_dir):
        raise UserError(f"--model_dir={model_dir} is not a run directory: it has no {FLAGS_FILE}")


def write_flags(model_dir, config):
    fs.write(fs.join(model_dir, FLAGS_FILE), config_lib.to_flagfile(config))


def read_flags(model_dir):
    """flags.txt -> {name: value as text}, booleans as 'true'/'false'."""
    path = fs.join(model_dir, FLAGS_FILE)
    return parse_flagfile(fs.read_text(path), path)


def parse_flagfile(text, source):
    """`--name=value`, `--flag` and `--noflag` lines (as research.config writes them) -> {name: value as text}; any
    other line but blanks and comments is an error naming `source` and the line."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise UserError(f"{source} line {number}: expected --name=value, got {line!r}")
        name, equals, value = line[2:].partition("=")
        if not equals:  # A boolean: --flag, or --noflag unless a flag is itself named no...
            name, value = (name[2:], "false") if name.startswith("no") and name not in config_lib.FLAGS else \
                (name, "true")
        values[name] = value
    return values


def record_flag_changes(model_dir, step, changes):
    """Adds to flags_history.jsonl that the run went on from `step` with `changes` ({name: (old, new)})."""
    fs.append_line(fs.join(model_dir, FLAGS_HISTORY_FILE), json.dumps(
        {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "changes": {name: list(change) for name, change in sorted(changes.items())}}))


STEP_RECORDS = (METRICS_FILE, BEST_DIR, RESULTS_FILE, "train", "eval", CURVES_FILE, REPORT_FILE, CONFUSION_FILE,
                PREDICTIONS_FILE, RELIABILITY_FILE, MISTAKES_FILE, "eval_*", "*.examples.npz")  # What a run writes of
# its steps (train/, eval/, eval_<split>/: TensorBoard; <tag>.examples.npz: per-example records), not of its setup.


def _step_records(model_dir):
    """The names of STEP_RECORDS present in `model_dir`, patterns expanded."""
    return list(dict.fromkeys(posixpath.basename(path) for name in STEP_RECORDS for path in (
        fs.glob(fs.join(model_dir, name)) if "*" in name else [fs.join(model_dir, name)]) if fs.gfile().exists(path)))


def has_records(model_dir):
    """Whether `model_dir` holds anything of an earlier attempt at a run: its flags or a record of its steps."""
    return is_run(model_dir) or bool(_step_records(model_dir))


def rewind(model_dir, step, restart=False):
    """Removes what an earlier attempt recorded of the steps after `step` (it died before checkpointing them), so
    that no record of it stands in for this attempt's: evaluations in metrics.jsonl, best/ and results.json of later
    steps, and with `restart` (no checkpoint: the run starts again at step 0) every record of its steps, TensorBoard
    events and figures included. Returns the names removed."""
    if restart and not is_run(model_dir) and has_records(model_dir):
        raise UserError(f"{model_dir} holds records of an earlier run ({', '.join(_step_records(model_dir))}) but "
                        f"no {FLAGS_FILE} to check its settings against: use a new --model_dir, or remove them")
    removed = []
    metrics = read_metrics(model_dir)
    kept = [record for record in metrics if record["step"] <= step]
    if len(kept) < len(metrics):
        fs.write(fs.join(model_dir, METRICS_FILE), "".join(json.dumps(record) + "\n" for record in kept))
        removed.append(f"{METRICS_FILE} lines of steps {', '.join(str(r['step']) for r in metrics[len(kept):])}")
    if read_best(model_dir).get("step", -1) > step:
        fs.remove_tree(fs.join(model_dir, BEST_DIR))
        removed.append(f"{BEST_DIR}/")
    if (read_results(model_dir) or {}).get("step", -1) > step:
        fs.gfile().remove(fs.join(model_dir, RESULTS_FILE))
        removed.append(RESULTS_FILE)
    for name in _step_records(model_dir) if restart else ():
        if name in STEP_RECORDS[:3]:  # (Those above.)
            continue
        path = fs.join(model_dir, name)
        if fs.gfile().isdir(path):
            fs.remove_tree(path)
            removed.append(f"{name}/")
        elif fs.gfile().exists(path):
            fs.gfile().remove(path)
            removed.append(name)
    return removed


def write_dataset_info(model_dir, info):
    fs.write_json(fs.join(model_dir, DATASET_FILE), info, indent=None)


def read_dataset_info(model_dir):
    """dataset.json as a dict."""
    info = recorded_dataset_info(model_dir)
    if info is None:
        raise UserError(f"{model_dir} has no {DATASET_FILE}: its training has not got past loading the data")
    return info


def recorded_dataset_info(model_dir):
    """dataset.json as a dict, or None where the run has none yet; one that lists no class names is an error."""
    path = fs.join(model_dir, DATASET_FILE)
    if not fs.gfile().exists(path):
        return None
    record = fs.read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("class_names"), list):
        raise UserError(f"{path} is unreadable: it lists no class_names")
    return record


def recorded_class_names(model_dir):
    """The class names dataset.json records (the truth on resume), or None where the run has none yet."""
    record = recorded_dataset_info(model_dir)
    return None if record is None else record["class_names"]


def read_data_files(model_dir):
    """data_files.json (a folder dataset's file lists: {"root", "class_names", "splits"}), or {} if none."""
    path = fs.join(model_dir, DATA_FILES_FILE)
    if not fs.gfile().exists(path):
        return {}
    lists = fs.read_json(path)
    try:
        classes = len(lists["class_names"])
        splits = lists["splits"].values()
        whole = isinstance(lists["root"], str) and all(files for files in splits) and all(
            isinstance(path, str) and 0 <= label < classes for files in splits for path, label in files)
    except (KeyError, TypeError, ValueError, AttributeError):
        whole = False
    if not whole:
        raise UserError(f"{path} is damaged: it holds no valid file lists (delete it to list the folder anew)")
    return lists


def write_data_files(model_dir, lists):
    """Only research.train writes it, when a run starts: no reader of the data changes a run's file lists."""
    fs.write_json(fs.join(model_dir, DATA_FILES_FILE), lists, indent=None)


def append_metrics(model_dir, record):
    fs.append_line(fs.join(model_dir, METRICS_FILE), json.dumps(record))


def read_metrics(model_dir, every_line=False):
    """The evaluations of metrics.jsonl, one dict per step in step order ([] if none yet), or with `every_line`
    every line as written.

    A step evaluated twice (a run resumed from a checkpoint older than its last evaluation) keeps its latest line.
    """
    records = _read_records(fs.join(model_dir, METRICS_FILE), "step")
    if every_line:
        return records
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def read_flags_history(model_dir):
    """flags_history.jsonl's records ({step, time, changes: {name: [old, new]}}), oldest first ([] if none)."""
    return _read_records(fs.join(model_dir, FLAGS_HISTORY_FILE), "step")


def append_provenance(model_dir, record):
    fs.append_line(fs.join(model_dir, PROVENANCE_FILE), json.dumps(record))


def read_provenance(model_dir):
    """provenance.jsonl's records, oldest first ([] for a run without one: older than research/provenance.py)."""
    return _read_records(fs.join(model_dir, PROVENANCE_FILE))


def _read_records(path, key=None):
    """The JSON objects of a .jsonl file, one a line ([] if there is no file), each holding an integer `key` if
    given. A last line still being written by a running run (on a filesystem without rename) is left out; any other
    bad line is an error naming it."""
    if not fs.gfile().exists(path):
        return []
    records = []
    lines = fs.read_text(path).split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) and (not key or type(record.get(key)) is int) else (
                "not a JSON object" + (f" with a whole-number {key}" if key else ""))
        except ValueError:
            problem = "not JSON"
        if problem is None:
            records.append(record)
        elif number < len(lines):  # A last line with no newline yet is one the writer is still writing.
            raise UserError(f"{path}: line {number} is {problem}")
    return records


def write_results(model_dir, results):
    fs.write_json(fs.join(model_dir, RESULTS_FILE), results)


def read_results(model_dir):
    """results.json, or None for a run that has not finished."""
    path = fs.join(model_dir, RESULTS_FILE)
    if not fs.gfile().exists(path):
        return None
    results = fs.read_json(path)
    if not isinstance(results, dict) or type(results.get("step")) is not int:
        raise UserError(f"{path} is not a results record (a JSON object with a whole-number step): delete it, and "
                        "rerun the run's command to write it anew")
    return results


def read_best(model_dir):
    """best/best.json: the best evaluation's accuracy, step, split and examples so far ({'accuracy': -1} before the
    first; runs older than eval sets recorded no split)."""
    path = fs.join(model_dir, BEST_DIR, BEST_FILE)
    if not fs.gfile().exists(path):
        return {"accuracy": -1.0}
    best = fs.read_json(path)
    if not isinstance(best, dict) or type(best.get("accuracy")) not in (int, float):
        raise UserError(f"{path} is not a best-checkpoint record (an accuracy and a step): delete "
                        f"{fs.join(model_dir, BEST_DIR)} to track the best evaluation anew")
    return best


def write_best(model_dir, best):
    fs.write_json(fs.join(model_dir, BEST_DIR, BEST_FILE), best, indent=None)


def per_example_path(model_dir, tag):
    """Where an evaluation of eval set `tag` (eval, eval_<split>) keeps each example's label, prediction and
    confidence (research/evaluation.py)."""
    return fs.join(model_dir, f"{tag}.examples.npz")


@contextlib.contextmanager
def created(model_dir, remove_on_failure=True):
    """Creates `model_dir` if it does not exist, as one error line if it cannot be; if it was created here and
    the block fails before flags.txt is written (bad data, a model that does not fit), it is removed again."""
    fs.check_filesystem(model_dir)
    is_new = not fs.gfile().exists(model_dir)
    if not is_new and not fs.gfile().isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} is a file, not a directory")
    try:
        fs.gfile().makedirs(model_dir)
    except fs.tensorflow().errors.OpError as e:
        reason = e.message.split(";")[-1].strip() if ";" in e.message else e.message.splitlines()[0]
        raise UserError(f"--model_dir={model_dir} cannot be created: {reason}") from None
    if not fs.is_url(model_dir) and not os.access(model_dir, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir={model_dir} is not writable")
    try:
        yield
    except BaseException:
        if remove_on_failure and is_new and not is_run(model_dir):
            fs.remove_tree(model_dir)
        raise


