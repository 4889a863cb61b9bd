"""Compare finished and running runs: `python -m research.compare RUN_DIR_OR_SWEEP_ROOT... [--sort=eval_loss]`.

A run is a directory with flags.txt (see research/trainer.py); a sweep root (launch/sweep.py) is a directory with
runs beneath it. The table shows only the flags that differ between the runs, since the rest says nothing about
why their results differ. Runs whose flags differ only in --seed are one row with the mean ± sample standard
deviation over seeds, because one seed's accuracy is too noisy to rank settings by (--per_run shows every run).
Finished runs report results.json (no eval numbers before a --follow sidecar fills in those of a run trained with
--eval_every=never); unfinished ones (no results.json) their latest metrics.jsonl line, with the
status column saying so (failed, interrupted or running where the sweep's sweep.json says so). Where the runs' own
records of what ran them (provenance.jsonl: research/provenance.py) differ -- Python, TensorFlow, Keras or TFDS
version, code commit, host, CPU, GPUs -- those are columns too (a resume that changed one shows 'old -> new'; a run
older than those records '-'); runs of other software are never averaged together. A single run's eval accuracy
shows its 95% Wilson interval; a run's wall time adds up all its starts (a resumed run's segments), and flags
changed on a resume (flags_history.jsonl) are a column. Given exactly two runs whose final evaluations saw the same
examples (their eval.examples.npz), McNemar's exact test says whether they differ beyond chance. Also saves a plot
of the runs' eval accuracy curves: `compare.png` in the sweep root, or --plot=PATH. Every mistake is one
`error: ...` line on stderr, exit status 2.
"""

import csv
import json
import os
import statistics
import sys

from research import cli, fs

if __name__ == "__main__":
    cli.start()

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from research import UserError, config as config_lib, per_example, provenance, run_dir  # noqa: E402

ASCENDING = ("eval_loss", "train_loss", "steps", "wall_time_s", "params")
METRICS = ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss", "steps", "wall_time_s", "params",
           "eval_top5_accuracy")
WITH_STD = ("eval_accuracy", "eval_top5_accuracy", "eval_loss", "train_accuracy", "train_loss")
TABLE_METRICS = ("steps", "eval_accuracy", "eval_top5_accuracy", "eval_loss", "wall_time_s", "params")


def find_runs(paths):
    """Run directories named by `paths` (each a run or a sweep root) -> ([(run_dir, name, sweep status)], roots).

    A run's name is its directory's name when one sweep root is given, else its path.
    """
    runs, roots = [], []
    for path in paths:
        fs.check_filesystem(path, "a run or sweep root")
        if not fs.isdir(path):
            raise UserError(f"{path}: {'not a directory' if fs.exists(path) else 'no such directory'}")
        path = path.rstrip("/")
        if run_dir.is_run(path):
            runs.append((path, _normpath(path), None))
            continue
        beneath = [fs.join(path, entry.rstrip("/")) for entry in fs.listdir(path)]
        beneath = [run for run in beneath if run_dir.is_run(run)]
        if not beneath:
            raise UserError(f"{path} is not a run directory (no {run_dir.FLAGS_FILE}) and has no run directories "
                            "beneath it")
        statuses = _sweep_statuses(path)
        name = _basename if len(paths) == 1 else _normpath
        runs += [(run, name(run), statuses.get(_basename(run))) for run in beneath]
        roots.append(path)
    unique = {}  # A run named twice (`r r/`, or a root and a run in it) is one run, never two seeds.
    for run in runs:
        unique.setdefault(_normpath(run[0]), run)
    return list(unique.values()), roots


def _basename(path):
    return path.rstrip("/").rsplit("/", 1)[-1]


def _normpath(path):
    return path if fs.is_url(path) else os.path.normpath(path)


def _sweep_statuses(root):
    """{run name: status} from the sweep's record, so failed and running runs say so; {} outside sweeps."""
    path = fs.join(root, run_dir.SWEEP_FILE)
    if not fs.exists(path):
        return {}
    try:
        runs = [(run["name"], run["status"], run["log"]) for run in fs.read_json(path)["runs"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not a launch.sweep record (lacks {e})") from None
    for name, status, log in runs:
        if status == "failed" and not run_dir.is_run(fs.join(root, name)):
            print(f"note: {name} failed before it started training; log: {log}", file=sys.stderr)
    return {name: status for name, status, _ in runs}


def read_run(path, name, sweep_status):
    """One run's flags, status, final (or latest) metrics and eval accuracy curve."""
    flags = run_dir.read_flags(path)
    lines = run_dir.read_metrics(path, every_line=True)
    evals = [line for line in run_dir.read_metrics(path) if "accuracy" in line]
    changed = [f"--{flag} {old} -> {new} at {record['step']}" for record in run_dir.read_flags_history(path)
               for flag, (old, new) in record.get("changes", {}).items()]
    run = {"dir": path, "name": name, "seed": flags.get("seed"), "flags": flags,
           "provenance": provenance.summary(run_dir.read_provenance(path)), "changed": "; ".join(changed),
           "curve": [(line["step"], line["accuracy"]) for line in evals]}
    results = run_dir.read_results(path)
    if results is not None:
        try:  # (An eval of None: the run trained with --eval_every=never, not yet completed by --follow.)
            final = results["eval"] if results["eval"] is not None else {"accuracy": None, "loss": None}
            run.update(status="finished", steps=results["step"], eval_accuracy=final["accuracy"],
                       eval_accuracy_95=final.get("accuracy_95"),
                       eval_top5_accuracy=final.get("top5_accuracy"), eval_loss=final["loss"],
                       train_accuracy=results["train"].get("accuracy"), train_loss=results["train"].get("loss"),
                       wall_time_s=_whole_wall_time(lines, results["wall_time_s"]), params=results["params"])
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{fs.join(path, run_dir.RESULTS_FILE)} is not a research.train results file "
                            f"(lacks {e})") from None
        return _numbers_checked(run, fs.join(path, run_dir.RESULTS_FILE))
    latest = evals[-1] if evals else {}
    status = sweep_status if sweep_status in ("failed", "running", "interrupted") else "unfinished"
    run.update(status=status, steps=latest.get("step"), eval_accuracy=latest.get("accuracy"),
               eval_accuracy_95=latest.get("accuracy_95"), eval_top5_accuracy=latest.get("top5_accuracy"),
               eval_loss=latest.get("loss"), train_accuracy=latest.get("train_accuracy"),
               train_loss=latest.get("train_loss"), wall_time_s=_whole_wall_time(lines, latest.get("elapsed_s")),
               params=None)
    return _numbers_checked(run, fs.join(path, run_dir.METRICS_FILE))


def _whole_wall_time(lines, last):
    """The wall time of all the run's starts: each earlier start's last elapsed_s in metrics.jsonl plus `last`, the
    latest start's own (results.json's, or its latest line's). Runs older than the `segment` field: `last` alone."""
    segments = {}
    for line in lines:
        if type(line.get("segment")) is int and isinstance(line.get("elapsed_s"), (int, float)):
            segments[line["segment"]] = max(segments.get(line["segment"], 0), line["elapsed_s"])
    if last is None or not segments:
        return last
    segments[max(segments)] = last
    return round(sum(segments.values()), 1)


def _numbers_checked(run, source):
    """`run`, once every figure it reports is a number (or absent): a hand-edited file is one error line naming it,
    not a traceback from the averaging."""
    figures = [(source, key, run[key]) for key in (*TABLE_METRICS, "train_accuracy", "train_loss")]
    figures += [(fs.join(run["dir"], run_dir.METRICS_FILE), f"accuracy at step {step}", accuracy)
                for step, accuracy in run["curve"]]
    for path, key, value in figures:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: {key} is {value!r}, not a number")
    return run


def differing_flags(runs):
    """Names of the flags whose values are not the same in every run, in flags.txt order, but for where their files
    are and how they ran (PATH and RUNTIME flags: the run directory differs between any two runs, and the cadence
    or devices say nothing of their numbers)."""
    names = list(dict.fromkeys(name for run in runs for name in run["flags"]))
    return [name for name in names if name not in config_lib.names_with(config_lib.PATH, config_lib.RUNTIME)
            and len({run["flags"].get(name) for run in runs}) > 1]


def differing_provenance(runs):
    """Names of the provenance fields (research/provenance.py: versions, code, machine) whose values are not the
    same in every run; a run without a provenance file (older than it) counts as '-'."""
    return [name for name in provenance.SUMMARY_FIELDS
            if len({run["provenance"].get(name, "-") for run in runs}) > 1]


def make_rows(runs, per_run):
    """Rows of the comparison: one per run, or one per group of runs that differ only in seed (and status) and in
    the machine they ran on (whose differing values the row lists)."""
    shown = differing_flags(runs)
    if not per_run:
        shown = [name for name in shown if name != "seed"]
    origins = differing_provenance(runs)
    software = [name for name in origins if name not in provenance.MACHINE_FIELDS]
    groups = {}
    for run in runs:
        key = (run["dir"],) if per_run else (run["status"], tuple((n, run["flags"].get(n)) for n in shown),
                                             tuple(run["provenance"].get(n, "-") for n in software))
        groups.setdefault(key, []).append(run)
    rows = []
    for members in groups.values():
        row = {"flags": {name: members[0]["flags"].get(name) for name in shown},
               "provenance": {name: " | ".join(dict.fromkeys(run["provenance"].get(name, "-") for run in members))
                              for name in origins},
               "seeds": [run["seed"] for run in members], "status": members[0]["status"],
               "changed": " | ".join(dict.fromkeys(run["changed"] for run in members if run["changed"])),
               "eval_accuracy_95": members[0]["eval_accuracy_95"] if len(members) == 1 else None}
        for metric in METRICS:
            values = [run[metric] for run in members if run[metric] is not None]
            row[metric] = statistics.fmean(values) if values else None
            if metric in ("steps", "params") and row[metric] is not None and row[metric].is_integer():
                row[metric] = int(row[metric])
            if metric in WITH_STD:
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["runs"] = members
        rows.append(row)
    return rows


def sort_rows(rows, metric):
    """Best first: highest accuracy, lowest loss; the other metrics ascending; rows lacking the metric last."""
    sign = 1 if metric in ASCENDING else -1
    return sorted(rows, key=lambda row: (row[metric] is None, sign * (row[metric] or 0)))


def _row_name(row, per_run):
    return row["runs"][0]["name"] if per_run else " ".join(f"{k}={v}" for k, v in row["flags"].items())


def _fmt(metric, value, std=None, interval=None):
    if value is None:
        return "-"
    if metric in ("steps", "params", "wall_time_s"):
        return str(value) if isinstance(value, int) else f"{value:.1f}"
    if interval:
        return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def format_table(rows, per_run):
    """Aligned plain-text table, one line per row."""
    flag_names = list(rows[0]["flags"])
    origin_names = list(rows[0]["provenance"])
    # Top-5 accuracy exists for datasets of more than 5 classes only: a column where some run has it.
    metrics = [m for m in TABLE_METRICS if m != "eval_top5_accuracy" or any(row[m] is not None for row in rows)]
    header = (["run"] if per_run else []) + flag_names + ([] if per_run else ["seeds"]) + ["status", *metrics]
    changes = any(row["changed"] for row in rows)
    header += origin_names + (["changed during the run"] if changes else [])
    lines = [header]
    for row in rows:
        cells = [row["runs"][0]["name"]] if per_run else []
        cells += [str(row["flags"][name]) for name in flag_names]
        cells += [] if per_run else [",".join(str(s) for s in row["seeds"])]
        cells += [row["status"]] + [_fmt(m, row[m], row.get(f"{m}_std"), row.get(f"{m}_95")) for m in metrics]
        cells += [row["provenance"][name] for name in origin_names] + ([row["changed"] or "-"] if changes else [])
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _public(row):
    """A row as plain data for --json/--csv: every run's numbers, no curves."""
    runs = [{k: v for k, v in run.items() if k not in ("curve", "flags")} for run in row["runs"]]
    return {**row, "runs": runs}


def write_csv(rows, out):
    flag_names, origin_names = list(rows[0]["flags"]), list(rows[0]["provenance"])
    columns = ["runs", *flag_names, "seeds", "status"]
    columns += [c for m in METRICS for c in ([m, f"{m}_std"] if m in WITH_STD else [m])] + origin_names
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = {**row, **row["flags"], **row["provenance"], "runs": " ".join(run["dir"] for run in row["runs"]),
                  "seeds": " ".join(str(s) for s in row["seeds"])}
        writer.writerow(["" if values[c] is None else values[c] for c in columns])


def plot_curves(rows, path, per_run):
    """Eval accuracy against step for every run; the runs of one row share a colour and a legend entry."""
    figure = Figure(figsize=(9, 5.5))  # Not pyplot: no display and no global figure registry (see research/plots.py).
    ax = figure.add_subplot()
    for i, row in enumerate(rows):
        label = _row_name(row, per_run) or row["runs"][0]["name"]
        if len(row["runs"]) > 1:
            label += f" ({len(row['runs'])} seeds)"
        for j, run in enumerate(row["runs"]):
            if run["curve"]:
                steps, accuracy = zip(*run["curve"])
                ax.plot(steps, accuracy, color=f"C{i % 10}", marker=".", alpha=0.8, label=None if j else label)
    ax.set(xlabel="step", ylabel="eval accuracy", title="Eval accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fs.save_figure(figure, path, bbox_inches="tight")


def parse_args(argv):
    parser = cli.Parser(prog="python -m research.compare", allow_abbrev=False,
                       description="Compare research.train runs: differing flags, final metrics, accuracy curves.")
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP_ROOT")
    parser.add_argument("--sort", default="eval_accuracy", choices=METRICS,
                        help="Best first by this metric (default eval_accuracy; losses ascending).")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="Print CSV instead of a table.")
    output.add_argument("--json", action="store_true", help="Print JSON (a list of rows with their runs).")
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument("--plot", metavar="PATH", help="Where to save the accuracy plot (default: "
                      "SWEEP_ROOT/compare.png when given one sweep root; no plot for run directories alone).")
    plot.add_argument("--no_plot", action="store_true", help="Save no plot.")
    parser.add_argument("--per_run", action="store_true", help="One row per run: no averaging over seeds.")
    return parser.parse_args(argv)


def main(argv=None):
    """Prints the comparison and saves the plot."""
    args = parse_args(argv)
    found, roots = find_runs(args.paths)
    runs = [read_run(*entry) for entry in found]
    rows = sort_rows(make_rows(runs, args.per_run), args.sort)
    if args.json:
        print(json.dumps([_public(row) for row in rows], indent=1))
    elif args.csv:
        write_csv(rows, sys.stdout)
    else:
        print(format_table(rows, args.per_run))
        if len(runs) == 2:
            print(per_example.paired_test([run["name"] for run in runs], [run["dir"] for run in runs]))
    plot_path = None if args.no_plot else args.plot or (fs.join(roots[0], run_dir.COMPARE_FILE) if len(roots) == 1
                                                        else None)
    if plot_path:
        plot_curves(rows, plot_path, args.per_run)
        print(f"plot: {plot_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(cli.run(main))
