"""One writer per run directory: the LOCK file (research/run_dir.py names it), on any filesystem TensorFlow writes;
`LOCK.follow` likewise keeps one `research.evaluate --follow` sidecar per run, and `training_alive` tells the sidecar
whether a live process holds the training's LOCK, without taking it."""

import contextlib
import json
import math
import os
import socket
import threading
import time

from absl import logging

from research import UserError, fs
from research.run_dir import LOCK_FILE


class Lock:
    """One writer per run directory: the LOCK file names host, pid and a heartbeat time that a live run refreshes
    every HEARTBEAT_S seconds, so that it works on filesystems without fcntl or atomic create (object stores).

    A lock is taken over when its owner is gone: a dead process on this host at once; on another host (a SLURM job
    requeued onto a new node, say) when its heartbeat is older than `stale_after_s`, saying so in one line.
    """

    HEARTBEAT_S = 30.0

    def __init__(self, model_dir, stale_after_s=300.0, name=LOCK_FILE):
        self.path = fs.join(model_dir, name)
        self.stale_after_s = stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stopped = threading.Event()
        self._beating = None

    def __enter__(self):
        if fs.gfile().exists(self.path):
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
        with contextlib.suppress(fs.tensorflow().errors.OpError, UserError):
            if self._ours(self._read()):
                fs.gfile().remove(self.path)

    def _beat(self):
        while not self._stopped.wait(self.HEARTBEAT_S):
            with contextlib.suppress(fs.tensorflow().errors.OpError, UserError):  # A missed beat is not worth a crash.
                self._write()

    def _write(self):
        fs.write_json(self.path, {**self.owner, "heartbeat": time.time()}, indent=None)

    def _read(self):
        """The holder {'host', 'pid', 'heartbeat'}. A lock of an older version of this code ('host pid') counts
        as beating when its file was last written. Any other content is one error line: no run of this code wrote
        it, so nothing says whether its writer is alive."""
        try:
            text = fs.gfile().GFile(self.path, "rb").read().decode().strip()
        except (fs.tensorflow().errors.OpError, UnicodeDecodeError):
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
            holder["heartbeat"] = fs.gfile().stat(self.path).mtime_nsec / 1e9
        return holder

    def _ours(self, holder):
        return (holder["host"], holder["pid"]) == (self.owner["host"], self.owner["pid"])

    def _stale(self, holder, say=True):
        if holder["host"] == self.owner["host"]:
            return not _alive(holder["pid"])
        silent = time.time() - holder["heartbeat"]
        if silent < self.stale_after_s:
            return False
        if say:
            logging.warning("taking over %s from process %s on %s, whose heartbeat stopped %.0f s ago",
                            self.path, holder["pid"], holder["host"], silent)
        return True

    def held(self):
        """Whether a live process other than this one holds the lock now (by the rules it would be taken over
        by), read without taking it or writing anything."""
        if not fs.gfile().exists(self.path):
            return False
        try:
            holder = self._read()
        except (UserError, fs.tensorflow().errors.OpError):  # Removed meanwhile, or no run of this code wrote it.
            return False
        return not self._ours(holder) and not self._stale(holder, say=False)


def training_alive(model_dir):
    """Whether a live process holds `model_dir`'s LOCK: its training (or another writer of the run) is running."""
    return Lock(model_dir).held()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
