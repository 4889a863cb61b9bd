"""Where a run's numbers came from: every start and resume of a run appends one record to its provenance.jsonl
(research/run_dir.py) with the software versions, the code's git commit, the machine, the command line and time.

Why: a result is reproducible only with the code and libraries that made it, and a run resumed after an upgrade
is made by two. `research.compare` shows the fields in which runs differ; a resume under other versions (or
other code) than the run's previous start says so in one warning line. Collecting never fails a run: a field
that cannot be found is "unknown" (the commit outside a git checkout, or where git is not installed).

A record: {"time": ISO 8601 UTC, "step": the step the run starts at (0 when new), "command": argv,
"python", "tensorflow", "keras", "tfds": versions, "git": {"commit", "dirty", "diff_sha256"}, "host",
"cpu": model name, "gpus": [names]}. `diff_sha256` hashes `git diff HEAD` and the names of untracked files, so
two dirty trees with the same hash ran the same code (None for a clean tree).
"""

import collections
import datetime
import hashlib
import os
import platform
import socket
import subprocess
import sys

from absl import logging

from research import run_dir

UNKNOWN = "unknown"
CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The checkout research/ is in.
VERSIONS = ("python", "tensorflow", "keras", "tfds")  # What a resume warns about when it changed, with the code.
GIT_TIMEOUT_S = 20


def record(model_dir, step, **inputs):
    """Appends this start's record to `model_dir`'s provenance.jsonl, first warning in one line if the versions
    or the code differ from the previous start's; `inputs` name what else the run reads that its flags do not
    pin by content (a distillation teacher: its path and weights hash). Returns the record."""
    current = {**collect(step), **inputs}
    previous = run_dir.read_provenance(model_dir)
    if previous:
        changes = differences(previous[-1], current)
        if changes:
            logging.warning("resuming %s under other versions than its previous start (%s): %s", model_dir,
                            previous[-1].get("time", "?"), "; ".join(changes))
    run_dir.append_provenance(model_dir, current)
    return current


def collect(step=0):
    """This process's record (see the module docstring)."""
    import keras
    import tensorflow as tf
    import tensorflow_datasets as tfds

    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "step": step,
            "command": list(sys.argv), "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "tfds": tfds.__version__, "git": git_state(CODE_DIR),
            "host": socket.gethostname(), "cpu": cpu_model(), "gpus": gpu_names()}


def git_state(directory):
    """{"commit", "dirty", "diff_sha256"} of the git checkout holding `directory`; commit "unknown" (dirty and
    hash None) outside one, or without git."""
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": UNKNOWN, "dirty": None, "diff_sha256": None}
    status = _git(directory, "status", "--porcelain")
    diff = _git(directory, "diff", "HEAD", "--binary", text=False)
    if status is None or diff is None:
        return {"commit": commit.strip(), "dirty": None, "diff_sha256": None}
    untracked = sorted(line[3:] for line in status.splitlines() if line.startswith("??"))
    dirty = bool(status.strip())
    digest = hashlib.sha256(diff + "\n".join(untracked).encode()).hexdigest() if dirty else None
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": digest}


def _git(directory, *args, text=True):
    """git's output, or None where git is missing, fails (not a checkout) or hangs."""
    try:
        done = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=text,
                              timeout=GIT_TIMEOUT_S, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def gpu_names():
    """The names of the GPUs TensorFlow sees ([] on a CPU-only machine)."""
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except (ValueError, RuntimeError):
            names.append(gpu.name)
    return names


def code_version(entry):
    """The code a record ran, in one string: the commit (12 digits), with '+dirty:HASH' for a dirty tree."""
    state = entry.get("git") or {}
    commit = str(state.get("commit", UNKNOWN))
    code = commit[:12] if commit != UNKNOWN else UNKNOWN
    if state.get("dirty"):
        code += f"+dirty:{str(state.get('diff_sha256'))[:8]}"
    return code


def differences(before, after):
    """'name OLD -> NEW' for each version (and the code) that differs between two records."""
    fields = [(name, before.get(name), after.get(name)) for name in VERSIONS]
    fields.append(("code", code_version(before), code_version(after)))
    return [f"{name} {old} -> {new}" for name, old, new in fields if old != new]


def _gpus(entry):
    """'2x NVIDIA H100 80GB HBM3' (a count per name), 'none' on CPUs."""
    counts = collections.Counter(entry.get("gpus") or [])
    return ", ".join(f"{count}x {name}" for name, count in sorted(counts.items())) or "none"


# What research.compare shows of a run's records: field -> its value in one record.
SUMMARY_FIELDS = {**{name: lambda entry, name=name: entry.get(name) for name in VERSIONS}, "code": code_version,
                  "host": lambda entry: entry.get("host"), "cpu": lambda entry: entry.get("cpu"), "gpus": _gpus}
MACHINE_FIELDS = ("host", "cpu", "gpus")  # Where a run ran, rather than what ran it.


def summary(records):
    """{field: value} of a run's records for research.compare: each field's values over the run's starts, in
    order, joined by ' -> ' where a resume changed it; {} for a run without records (older than this module)."""
    if not records:
        return {}
    result = {}
    for name, value_of in SUMMARY_FIELDS.items():
        values = list(dict.fromkeys("-" if value_of(entry) is None else str(value_of(entry)) for entry in records))
        result[name] = " -> ".join(values)
    return result
