"""The run directory, on any filesystem TensorFlow can write: the names of its files and every read and write of
them. Nothing else in the codebase opens a run file, but for the console log of a sweep's run (launch/sweep.py
hands it to the run's process as its stdout).

Every path goes through `tf.io.gfile`, so `--model_dir` (and a sweep root, an export) can be a local path or a URL:
gs://, s3://, hdfs://, or ram:// (TensorFlow's in-memory filesystem, which the tests use as a stand-in for object
storage). A URL is never a local path. Each file is written whole: under a temporary name and then renamed where
the filesystem renames (local disks, NFS, HDFS), so that a reader or a kill never meets half a file; written in one
piece where it cannot (an object store's upload is atomic by itself). Object stores cannot append, so appending a
line rewrites the file (metrics.jsonl: one line per evaluation, a few kB).

Layout (research/trainer.py writes it, the tools read it):
  flags.txt      the resolved flags, itself a valid --flagfile      dataset.json   image shape, classes, preprocessing
  data_files.json  the file lists of a --dataset=folder:PATH run
  metrics.jsonl  one JSON line per evaluation                       results.json   the final evaluation and totals
  flags_history.jsonl  the flags a resume changed (learning rate, length, ...), one line per such resume
  provenance.jsonl  one JSON line per start or resume: versions, git commit, host, devices, command (provenance.py)
  ckpt-N.*, checkpoint, best/ (best.json)    checkpoints (research/checkpoint.py)
  eval.examples.npz, eval_<split>.examples.npz  each example's label, prediction, confidence (per_example.py)
  train/, eval/, eval_<split>/  TensorBoard events   LOCK  the one writer   curves.png, report.json, ...  figures
"""

import contextlib
import io
import json
import math
import os
import posixpath
import socket
import threading
import time

from absl import logging

from research import UserError, config as config_lib



def _tf():
    """TensorFlow, imported at the first file operation rather than with this module: a sweep's --dry_run names its
    runs' paths and finds the finished local ones without loading it (it takes seconds)."""
    import tensorflow  # noqa: PLC0415 - see above.
    return tensorflow


def _gfile():
    return _tf().io.gfile

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
CURVES_FILE = "curves.png"
REPORT_FILE = "report.json"
CONFUSION_FILE = "confusion_matrix.png"
PREDICTIONS_FILE = "predictions.png"
RELIABILITY_FILE = "reliability.png"
MISTAKES_FILE = "mistakes.png"
SWEEP_FILE = "sweep.json"  # In a sweep root (launch/sweep.py), beside its runs...
COMPARE_FILE = "compare.png"  # ...and research.compare's plot of them.
LOG_FILE = "train.log"  # In each run of a sweep: its console output.


def join(*parts):
    return posixpath.join(*parts)  # What tf.io.gfile.join does on POSIX systems, for local paths and URLs alike.


def is_url(path):
    return "://" in str(path)


def exists(path):
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)  # (See _tf.)


def isdir(path):
    return _gfile().isdir(path)


def listdir(path):
    return sorted(_gfile().listdir(path))


def glob(pattern):
    return _gfile().glob(pattern)


def makedirs(path):
    _gfile().makedirs(path)


def remove(path):
    with contextlib.suppress(_tf().errors.OpError):
        _gfile().remove(path)


def remove_tree(path):
    with contextlib.suppress(_tf().errors.OpError):
        _gfile().rmtree(path)


def check_filesystem(path, flag="--model_dir"):
    """One error line, before any work, for a path TensorFlow cannot open: an unknown scheme, missing credentials
    or an unreachable object store."""
    try:
        _gfile().exists(path)
    except _tf().errors.OpError as e:
        raise UserError(f"{flag}={path}: TensorFlow cannot open it ({e.message.splitlines()[0][:200]})") from None


# ------------------------------------------------------------------------------------------------ Whole files
def read_bytes(path):
    try:
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    except _tf().errors.OpError as e:
        raise UserError(f"cannot read {path}: {e.message}") from None


def read_text(path):
    try:
        return read_bytes(path).decode()
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def write(path, data):
    """Writes `data` (str or bytes) to `path` whole: see the module docstring."""
    data = data.encode() if isinstance(data, str) else data
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with _gfile().GFile(temporary, "wb") as f:
            f.write(data)
        try:
            _gfile().rename(temporary, path, overwrite=True)
        except _tf().errors.UnimplementedError:  # No rename here: one upload is atomic by itself.
            _gfile().remove(temporary)
            with _gfile().GFile(path, "wb") as f:
                f.write(data)
    except _tf().errors.OpError as e:
        with contextlib.suppress(_tf().errors.OpError):
            _gfile().remove(temporary)
        raise UserError(f"cannot write {path}: {e.message.splitlines()[0]}") from None
    return path


def write_json(path, value, indent=1):
    return write(path, json.dumps(value, indent=indent) + "\n")


def append_line(path, line):
    """Adds one line at the end: the file is rewritten whole (object stores cannot append)."""
    write(path, (read_text(path) if _gfile().exists(path) else "") + line.rstrip("\n") + "\n")


def save_figure(figure, path, dpi=100, **options):
    """A matplotlib figure as a PNG file (rendered to bytes, then written like any other file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, **options)
    return write(path, buffer.getvalue())


def copy_tree(source, target):
    """Copies the directory `source` to `target` (which must not exist) file by file."""
    for directory, _, files in _gfile().walk(source):
        relative = os.path.relpath(directory, source)
        destination = target if relative == "." else join(target, relative)
        _gfile().makedirs(destination)
        for name in files:
            _gfile().copy(join(directory, name), join(destination, name))


# ------------------------------------------------------------------------------------------------ The run's files
def is_run(path):
    """Whether `path` holds a run (research/trainer.py writes flags.txt before the first step)."""
    return _gfile().exists(join(path, FLAGS_FILE))


def check_run(model_dir):
    """Fails with one line unless `model_dir` holds a run."""
    check_filesystem(model_dir)
    if not _gfile().isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} does not exist")
    if not is_run(model_dir):
        raise UserError(f"--model_dir={model_dir} is not a run directory: it has no {FLAGS_FILE}")


def write_flags(model_dir, config):
    write(join(model_dir, FLAGS_FILE), config_lib.to_flagfile(config))


def read_flags(model_dir):
    """flags.txt -> {name: value as text}, booleans as 'true'/'false'."""
    path = join(model_dir, FLAGS_FILE)
    return parse_flagfile(read_text(path), path)


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
    append_line(join(model_dir, FLAGS_HISTORY_FILE), json.dumps(
        {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "changes": {name: list(change) for name, change in sorted(changes.items())}}))


STEP_RECORDS = (METRICS_FILE, BEST_DIR, RESULTS_FILE, "train", "eval", CURVES_FILE, REPORT_FILE, CONFUSION_FILE,
                PREDICTIONS_FILE, RELIABILITY_FILE, MISTAKES_FILE, "eval_*", "*.examples.npz")  # What a run writes of
# its steps (train/, eval/, eval_<split>/: TensorBoard; <tag>.examples.npz: per-example records), not of its setup.


def _step_records(model_dir):
    """The names of STEP_RECORDS present in `model_dir`, patterns expanded."""
    return list(dict.fromkeys(posixpath.basename(path) for name in STEP_RECORDS for path in (
        glob(join(model_dir, name)) if "*" in name else [join(model_dir, name)]) if _gfile().exists(path)))


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
        write(join(model_dir, METRICS_FILE), "".join(json.dumps(record) + "\n" for record in kept))
        removed.append(f"{METRICS_FILE} lines of steps {', '.join(str(r['step']) for r in metrics[len(kept):])}")
    if read_best(model_dir).get("step", -1) > step:
        remove_tree(join(model_dir, BEST_DIR))
        removed.append(f"{BEST_DIR}/")
    if (read_results(model_dir) or {}).get("step", -1) > step:
        _gfile().remove(join(model_dir, RESULTS_FILE))
        removed.append(RESULTS_FILE)
    for name in _step_records(model_dir) if restart else ():
        if name in STEP_RECORDS[:3]:  # (Those above.)
            continue
        path = join(model_dir, name)
        if _gfile().isdir(path):
            remove_tree(path)
            removed.append(f"{name}/")
        elif _gfile().exists(path):
            _gfile().remove(path)
            removed.append(name)
    return removed


def write_dataset_info(model_dir, info):
    write_json(join(model_dir, DATASET_FILE), info, indent=None)


def read_dataset_info(model_dir):
    """dataset.json as a dict."""
    info = recorded_dataset_info(model_dir)
    if info is None:
        raise UserError(f"{model_dir} has no {DATASET_FILE}: its training has not got past loading the data")
    return info


def recorded_dataset_info(model_dir):
    """dataset.json as a dict, or None where the run has none yet; one that lists no class names is an error."""
    path = join(model_dir, DATASET_FILE)
    if not _gfile().exists(path):
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("class_names"), list):
        raise UserError(f"{path} is unreadable: it lists no class_names")
    return record


def recorded_class_names(model_dir):
    """The class names dataset.json records (the truth on resume), or None where the run has none yet."""
    record = recorded_dataset_info(model_dir)
    return None if record is None else record["class_names"]


def read_data_files(model_dir):
    """data_files.json (a folder dataset's file lists: {"root", "class_names", "splits"}), or {} if none."""
    path = join(model_dir, DATA_FILES_FILE)
    if not _gfile().exists(path):
        return {}
    lists = read_json(path)
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
    write_json(join(model_dir, DATA_FILES_FILE), lists, indent=None)


def append_metrics(model_dir, record):
    append_line(join(model_dir, METRICS_FILE), json.dumps(record))


def read_metrics(model_dir, every_line=False):
    """The evaluations of metrics.jsonl, one dict per step in step order ([] if none yet), or with `every_line`
    every line as written.

    A step evaluated twice (a run resumed from a checkpoint older than its last evaluation) keeps its latest line.
    """
    records = _read_records(join(model_dir, METRICS_FILE), "step")
    if every_line:
        return records
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def read_flags_history(model_dir):
    """flags_history.jsonl's records ({step, time, changes: {name: [old, new]}}), oldest first ([] if none)."""
    return _read_records(join(model_dir, FLAGS_HISTORY_FILE), "step")


def append_provenance(model_dir, record):
    append_line(join(model_dir, PROVENANCE_FILE), json.dumps(record))


def read_provenance(model_dir):
    """provenance.jsonl's records, oldest first ([] for a run without one: older than research/provenance.py)."""
    return _read_records(join(model_dir, PROVENANCE_FILE))


def _read_records(path, key=None):
    """The JSON objects of a .jsonl file, one a line ([] if there is no file), each holding an integer `key` if
    given. A last line still being written by a running run (on a filesystem without rename) is left out; any other
    bad line is an error naming it."""
    if not _gfile().exists(path):
        return []
    records = []
    lines = read_text(path).split("\n")
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
    write_json(join(model_dir, RESULTS_FILE), results)


def read_results(model_dir):
    """results.json, or None for a run that has not finished."""
    path = join(model_dir, RESULTS_FILE)
    if not _gfile().exists(path):
        return None
    results = read_json(path)
    if not isinstance(results, dict) or type(results.get("step")) is not int:
        raise UserError(f"{path} is not a results record (a JSON object with a whole-number step): delete it, and "
                        "rerun the run's command to write it anew")
    return results


def read_best(model_dir):
    """best/best.json: the best evaluation's accuracy, step, split and examples so far ({'accuracy': -1} before the
    first; runs older than eval sets recorded no split)."""
    path = join(model_dir, BEST_DIR, BEST_FILE)
    if not _gfile().exists(path):
        return {"accuracy": -1.0}
    best = read_json(path)
    if not isinstance(best, dict) or type(best.get("accuracy")) not in (int, float):
        raise UserError(f"{path} is not a best-checkpoint record (an accuracy and a step): delete "
                        f"{join(model_dir, BEST_DIR)} to track the best evaluation anew")
    return best


def write_best(model_dir, best):
    write_json(join(model_dir, BEST_DIR, BEST_FILE), best, indent=None)


def per_example_path(model_dir, tag):
    """Where an evaluation of eval set `tag` (eval, eval_<split>) keeps each example's label, prediction and
    confidence (research/evaluation.py)."""
    return join(model_dir, f"{tag}.examples.npz")


@contextlib.contextmanager
def created(model_dir, remove_on_failure=True):
    """Creates `model_dir` if it does not exist, as one error line if it cannot be; if it was created here and
    the block fails before flags.txt is written (bad data, a model that does not fit), it is removed again."""
    check_filesystem(model_dir)
    is_new = not _gfile().exists(model_dir)
    if not is_new and not _gfile().isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} is a file, not a directory")
    try:
        _gfile().makedirs(model_dir)
    except _tf().errors.OpError as e:
        reason = e.message.split(";")[-1].strip() if ";" in e.message else e.message.splitlines()[0]
        raise UserError(f"--model_dir={model_dir} cannot be created: {reason}") from None
    if not is_url(model_dir) and not os.access(model_dir, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir={model_dir} is not writable")
    try:
        yield
    except BaseException:
        if remove_on_failure and is_new and not is_run(model_dir):
            remove_tree(model_dir)
        raise


# ------------------------------------------------------------------------------------------------ One writer
class Lock:
    """One writer per run directory: the LOCK file names host, pid and a heartbeat time that a live run refreshes
    every HEARTBEAT_S seconds, so that it works on filesystems without fcntl or atomic create (object stores).

    A lock is taken over when its owner is gone: a dead process on this host at once; on another host (a SLURM job
    requeued onto a new node, say) when its heartbeat is older than `stale_after_s`, saying so in one line.
    """

    HEARTBEAT_S = 30.0

    def __init__(self, model_dir, stale_after_s=300.0):
        self.path = join(model_dir, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stopped = threading.Event()
        self._beating = None

    def __enter__(self):
        if _gfile().exists(self.path):
            holder = self._read()
            if not self._ours(holder) and not self._stale(holder):
                raise UserError(f"{os.path.dirname(self.path)} is in use by process {holder['pid']} on "
                                f"{holder['host']}; wait for it, or remove {self.path} if it is gone")
        self._write()
        if not self._ours(self._read()):  # Another process wrote its own in the same instant.
            raise UserError(f"{os.path.dirname(self.path)} was just taken by another process")
        self._beating = threading.Thread(target=self._beat, daemon=True, name="lock-heartbeat")
        self._beating.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._beating.join()
        with contextlib.suppress(_tf().errors.OpError, UserError):
            if self._ours(self._read()):
                _gfile().remove(self.path)

    def _beat(self):
        while not self._stopped.wait(self.HEARTBEAT_S):
            with contextlib.suppress(_tf().errors.OpError, UserError):  # A missed beat is not worth a crash.
                self._write()

    def _write(self):
        write_json(self.path, {**self.owner, "heartbeat": time.time()}, indent=None)

    def _read(self):
        """The holder {'host', 'pid', 'heartbeat'}. A lock of an older version of this code ('host pid') counts
        as beating when its file was last written. Any other content is one error line: no run of this code wrote
        it, so nothing says whether its writer is alive."""
        try:
            text = _gfile().GFile(self.path, "rb").read().decode().strip()
        except (_tf().errors.OpError, UnicodeDecodeError):
            text = None
        try:
            holder = json.loads(text)
            holder = {"host": holder["host"], "pid": holder["pid"], "heartbeat": float(holder["heartbeat"])}
        except (ValueError, KeyError, TypeError):
            host, _, pid = (text or "").partition(" ")
            holder = {"host": host, "pid": int(pid) if pid.isdigit() else None, "heartbeat": None}
        if not (isinstance(holder["host"], str) and holder["host"] and type(holder["pid"]) is int
                and 0 < holder["pid"] < 2**22 and (holder["heartbeat"] is None or math.isfinite(holder["heartbeat"]))):
            raise UserError(f"{self.path} is not a lock record of this code ({(text or 'unreadable')[:40]!r}): if no "
                            f"run is using {os.path.dirname(self.path)}, remove it")
        if holder["heartbeat"] is None:
            holder["heartbeat"] = _gfile().stat(self.path).mtime_nsec / 1e9
        return holder

    def _ours(self, holder):
        return (holder["host"], holder["pid"]) == (self.owner["host"], self.owner["pid"])

    def _stale(self, holder):
        if holder["host"] == self.owner["host"]:
            return not _alive(holder["pid"])
        silent = time.time() - holder["heartbeat"]
        if silent < self.stale_after_s:
            return False
        logging.warning("taking over %s from process %s on %s, whose heartbeat stopped %.0f s ago",
                        self.path, holder["pid"], holder["host"], silent)
        return True


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
