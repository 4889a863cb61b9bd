"""Grid sweeps: one research.train run per combination of flag values and seed, each a subprocess.

    python -m launch.sweep --flagfile=configs/cnn.cfg --grid=learning_rate=1e-3,3e-3 --grid=batch_size=32,128 \\
        --seeds=3 --root=runs/lr_bs [--parallel=2] [--dry_run] [--any_train_flag=value ...]

Each run is an ordinary research.train run directory under --root, named from its grid values and seed
(`lr=0.001_bs=32_s=0`), with its console output appended to `train.log` in it; so whatever works on one run
(resuming, TensorBoard, `python -m research.compare`) works on a sweep's runs. Runs are separate processes, so a
failing one cannot take the others down. The sweep keeps no state that the run directories do not already hold:
rerunning the same command skips runs that have results.json of the same settings and resumes the others from
their checkpoints (research.train does that by itself); a finished run whose length alone changed goes on.
`root/sweep.json` records, for the latest invocation, each run's flags, the command that produced it, log and
status: pending, running, finished, skipped (finished before with the same settings), refused (finished before
with other settings, named: its results are another command's, so nothing is trained or claimed there), failed
or interrupted.

Exit status: 0 when no run failed, 1 when some failed or were refused (each named with its log or its differences),
2 for a bad command line (one `error: ...` line on stderr), 130 after Ctrl-C (running runs get the SIGINT too, save
a checkpoint and stop).
"""

import concurrent.futures
import contextlib
import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from research import cli, fs

if __name__ == "__main__":
    cli.start()  # Before TensorFlow may load (train_flag): its start-up lines are held back.

from absl import flags  # noqa: E402

from research import UserError, config as config_lib, run_dir  # noqa: E402

FLAGS = config_lib.FLAGS


def train_flag(name):
    """research.train's flag `name`, or None. research.config's own flags are known without TensorFlow, so a sweep
    over them (learning rate, batch size, seeds, ...) plans and dry-runs in a fraction of a second; any other name
    (an optimizer's, a model family's, a data source's or an augmentation's flag, or a misspelling) imports the modules
    research.train imports, and TensorFlow with them, to find it."""
    if name not in config_lib.names_with(*config_lib.RUN_ROLES):
        importlib.import_module("research.train_lib")
    return FLAGS[name] if name in config_lib.names_with(*config_lib.RUN_ROLES) else None


def parse_args(argv):
    """(sweep options, extra research.train flags) from the command line; every mistake is a UserError."""
    parser = cli.Parser(prog="python -m launch.sweep", allow_abbrev=False,
                       description="Run research.train once per combination of --grid values and seed.",
                       epilog="Every other --name=value is a research.train flag, passed to every run.")
    parser.add_argument("--root", required=True, help="Directory that gets one run directory per combination.")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="A research.train flag and its values (repeatable; the sweep runs their product). "
                             "Separate values with ';' instead when they hold commas: hidden_units=128;128,128.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Run each combination with --seed=0..N-1 (default 1), unless --grid=seed=... is given.")
    parser.add_argument("--flagfile", action="append", default=[], help="research.train flagfile for every run.")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at a time.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run and write nothing.")
    parser.add_argument("--train_command", default=f"{shlex.quote(sys.executable)} -m research.train",
                        help="Command that trains one run, given research.train flags (default: this Python "
                             "-m research.train). Tests pass 'python tests/mock_train.py' to train on mock data.")
    args, extras = parser.parse_known_args(argv)
    if args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    for path in args.flagfile:
        if not os.path.isfile(path):
            raise UserError(f"--flagfile={path}: no such file")
    return args, extras


def parse_grid(specs):
    """`["learning_rate=1e-3,3e-3", ...]` -> [(flag, [(value as given, value for the run name), ...]), ...]."""
    grid = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise UserError(f"--grid={spec}: expected NAME=VALUE1,VALUE2,...")
        if train_flag(name) is None:
            raise UserError(f"--grid={spec}: --{name} is not a research.train flag (see research/config.py)")
        if name == "model_dir":
            raise UserError("--grid=model_dir=...: the sweep names each run's --model_dir under --root")
        if name in dict(grid):
            raise UserError(f"--grid: --{name} is given twice; list all its values in one --grid")
        values = text.split(";" if ";" in text else ",")
        if not all(v.strip() for v in values):
            raise UserError(f"--grid={spec}: empty value; expected NAME=VALUE1,VALUE2,...")
        labels = [_label(name, v) for v in values]
        repeated = sorted({v for v, label in zip(values, labels) if labels.count(label) > 1})
        if repeated:
            raise UserError(f"--grid={spec}: {', '.join(repeated)} name the same value twice")
        grid.append((name, list(zip(values, labels))))
    return grid


def _label(name, text):
    """The value as research.train reads it, spelled for a directory name (1e-3 -> 0.001; 128,128 -> 128-128)."""
    try:
        value = train_flag(name).parser.parse(text)
    except ValueError as e:
        raise UserError(f"--grid: --{name}={text}: {e}") from None
    spelled = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", spelled)


def check_extras(extras):
    """Extra arguments must be research.train flags as --name=value (or --flag/--noflag for booleans)."""
    for arg in extras:
        name, has_value, text = arg[2:].partition("=")
        if not arg.startswith("--") or not name:
            raise UserError(f"unexpected argument {arg!r}: give research.train flags as --name=value")
        if name in ("model_dir", "seed"):
            raise UserError(f"{arg}: the sweep sets --{name} of each run (use --root, --seeds or --grid=seed=...)")
        negated = train_flag(name[2:]) if name.startswith("no") else None  # --noflag for a boolean --flag.
        boolean_off = negated is not None and negated.boolean
        flag = None if boolean_off else train_flag(name)
        if flag is None and not boolean_off:
            raise UserError(f"{arg}: unknown flag --{name} (see research/config.py)")
        if boolean_off and has_value:
            raise UserError(f"{arg}: --no{name[2:]} takes no value")
        if not boolean_off and not has_value and not flag.boolean:
            raise UserError(f"{arg} needs a value: --{name}=VALUE")
        if has_value:
            try:
                flag.parser.parse(text)
            except ValueError as e:
                raise UserError(f"{arg}: {e}") from None


def plan(args, extras):
    """The sweep's runs, in order: dicts of name, dir, flags (grid values and seed), command, log, status."""
    grid = parse_grid(args.grid)
    check_extras(extras)
    for name, _ in grid:
        if any(arg[2:].partition("=")[0] in (name, f"no{name}") for arg in extras):
            raise UserError(f"--{name} is both in --grid and given for every run; keep one")
    if "seed" in dict(grid):
        if args.seeds is not None:
            raise UserError("give seeds either with --seeds or with --grid=seed=..., not both")
    else:
        grid.append(("seed", [(str(s), str(s)) for s in range(args.seeds or 1)]))
    short = _short_names([name for name, _ in grid])
    earlier = _earlier_commands(args.root)
    program = shlex.split(args.train_command)
    base = program + [f"--flagfile={path}" for path in args.flagfile] + extras
    runs = []
    for combination in itertools.product(*(values for _, values in grid)):
        chosen = [(name, text, label) for (name, _), (text, label) in zip(grid, combination)]
        run_name = "_".join(f"{short[name]}={label}" for name, _, label in chosen)
        directory = fs.join(args.root, run_name)
        command = base + [f"--{name}={text}" for name, text, _ in chosen] + [f"--model_dir={directory}"]
        run = {"name": run_name, "dir": directory, "flags": {name: text for name, text, _ in chosen},
               "command": command, "log": fs.join(directory, run_dir.LOG_FILE), "status": "pending"}
        if fs.exists(fs.join(directory, run_dir.RESULTS_FILE)):
            run.update(_finished_before(directory, command[len(program):]))
            if run["status"] == "refused":  # The command that produced it, if known (its flags.txt says all).
                run.update(command=earlier.get(run_name), refused_command=command)
            elif run["status"] == "skipped" and run_name in earlier:  # That command, of the same settings.
                run["command"] = earlier[run_name]
        runs.append(run)
    return runs


def _earlier_commands(root):
    """{run name: command} of the runs the root's sweep.json records ({} without one, or a damaged one)."""
    path = fs.join(root, run_dir.SWEEP_FILE)
    try:
        record = fs.read_json(path) if fs.exists(path) else {}
        return {run["name"]: run["command"] for run in record.get("runs", [])
                if isinstance(run.get("command"), list)}
    except (UserError, AttributeError, TypeError, KeyError):
        return {}


LENGTH_FLAGS = ("train_steps", "train_epochs")  # Changed, they continue a finished run (research.train resumes it).


def _finished_before(directory, train_args):
    """The status of a run that has results.json, judged against the flags its command gives now: skipped if its
    flags.txt records the same settings (as the resume guard judges them), pending if only its length changed (it
    goes on), and refused, with the differences, if anything else did: its results are another command's. Loads
    TensorFlow (seconds): every flag owner is needed to read a command's flags."""
    importlib.import_module("research.train_lib")  # (It imports every flag owner.)
    from research import checkpoint  # noqa: PLC0415 - see above.
    try:
        config = _command_config(train_args)
    except UserError:
        return {}  # A command research.train rejects: let it say why, in the run's log.
    try:
        changes = checkpoint.check_resume_config(directory, config)
    except checkpoint.SettingsDiffer as e:
        return {"status": "refused", "reason": "; ".join(e.differences)}
    changes = {name: change for name, change in changes.items()
               if config_lib.declared(name).role not in (config_lib.PATH, config_lib.RUNTIME)
               and config_lib.has_effect(name, config)}
    if not changes:
        return {"status": "skipped"}
    if set(changes) <= set(LENGTH_FLAGS):
        return {}
    return {"status": "refused", "reason": "; ".join(f"--{name}: {a} -> {b}" for name, (a, b) in changes.items())}


def _command_config(train_args):
    """The configuration research.train would build from `train_args` (flagfiles expanded), as research.config's
    make_config parses it; raises UserError for a command it would reject."""
    values = {}
    try:
        expanded = FLAGS.read_flags_from_files(train_args, force_gnu=False)
    except flags.Error as e:
        raise UserError(str(e)) from None
    for arg in expanded:
        name, has_value, text = arg[2:].partition("=")
        if has_value:
            values[name] = text
        elif name.startswith("no") and name not in FLAGS:
            values[name[2:]] = "false"
        else:
            values[name] = "true"
    return config_lib.make_config(**values)


def _short_names(names):
    """learning_rate -> lr, batch_size -> bs, seed -> s; flags whose initials clash keep their full names."""
    initials = {name: "".join(word[0] for word in name.split("_") if word) for name in names}
    clashing = {short for short in initials.values() if list(initials.values()).count(short) > 1}
    return {name: name if short in clashing else short for name, short in initials.items()}


class Ledger:
    """`root/sweep.json`: the runs and their status, rewritten whole (atomically) at every change of status."""

    def __init__(self, root, argv, runs):
        self.path = fs.join(root, run_dir.SWEEP_FILE)
        self.record = {"argv": argv, "runs": runs}
        self.lock = threading.Lock()

    def update(self, run, **fields):
        with self.lock:
            run.update(fields)
            self.write()

    def write(self):
        fs.write_json(self.path, self.record)


def execute(run, ledger):
    """Trains one run, its output appended to its log; returns the run with its final status."""
    fs.makedirs(run["dir"])
    ledger.update(run, status="running")
    started = time.time()
    with _console_log(run["log"]) as log:
        log.write(f"$ {shlex.join(run['command'])}\n")
        log.flush()
        try:
            code = subprocess.run(run["command"], stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        except OSError as e:  # The training command itself cannot start.
            log.write(f"error: cannot run {run['command'][0]}: {e}\n")
            code = 127
    status = "finished" if code == 0 else "interrupted" if code in (130, 143) else "failed"
    ledger.update(run, status=status, exit_code=code, seconds=round(time.time() - started, 1))
    return run


@contextlib.contextmanager
def _console_log(path):
    """A local file for a run's console output to go to: `path` itself, or for a URL a temporary file added to the
    end of `path` when the run ends."""
    if not fs.is_url(path):
        with open(path, "a") as log:
            yield log
        return
    with tempfile.TemporaryFile("w+") as log:
        try:
            yield log
        finally:
            log.seek(0)
            fs.write(path, (fs.read_text(path) if fs.exists(path) else "") + log.read())


def _last_line(path):
    lines = [line for line in fs.read_text(path).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_sweep(args, runs, argv):
    """Runs what is not finished, --parallel at a time, reporting each as it ends; returns the exit status."""
    todo = [run for run in runs if run["status"] == "pending"]
    print(f"sweep: {len(runs)} runs under {args.root}, {len(runs) - len(todo)} finished before, "
          f"{len(todo)} to run, {args.parallel} at a time", flush=True)
    fs.check_filesystem(args.root, "--root")
    fs.makedirs(args.root)
    ledger = Ledger(args.root, argv, runs)
    ledger.write()
    interrupted = False
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(execute, run, ledger) for run in todo]
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                run = future.result()
                line = f"[{done}/{len(todo)}] {run['status']} {run['name']} ({run['seconds']} s)"
                if run["status"] != "finished":
                    line += f", exit {run['exit_code']}: {_last_line(run['log'])} (log: {run['log']})"
                print(line, flush=True)
        except KeyboardInterrupt:  # Running runs got the SIGINT as well: they checkpoint and stop; start no more.
            interrupted = True
            for future in futures:
                future.cancel()
    for run in runs:
        if run["status"] == "refused":
            print(f"refused {run['name']}: it finished with other settings ({run['reason']}); use another --root, "
                  f"or remove {run['dir']} to train it anew", flush=True)
    counts = {status: sum(run["status"] == status for run in runs)
              for status in ("finished", "skipped", "refused", "failed", "interrupted", "pending")}
    print("sweep: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
          + f"; statuses in {ledger.path}", flush=True)
    return 130 if interrupted else 1 if counts["failed"] or counts["interrupted"] or counts["refused"] else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, extras = parse_args(argv)
    cli.check_lasting(args.root, "--root")
    if fs.is_url(args.root):  # (A local root needs no TensorFlow to check.)
        fs.check_filesystem(args.root, "--root")
    runs = plan(args, extras)
    if args.dry_run:
        for run in runs:
            print(f"# {run['name']}: finished, skipped" if run["status"] == "skipped" else
                  f"# {run['name']}: finished with other settings ({run['reason']}), refused"
                  if run["status"] == "refused" else shlex.join(run["command"]))
        return 0
    return run_sweep(args, runs, argv)


if __name__ == "__main__":
    sys.exit(cli.run(main))
