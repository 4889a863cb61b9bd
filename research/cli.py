"""What every program of this codebase (research.train, .evaluate, .predict, .export, .benchmark, .models) shares
on the command line: a mistake is one `error: ...` line on stderr and exit status 2, never a usage dump or a
traceback, and nothing but our own lines reaches stderr.

Standard library and absl only: a program calls `start()` before it imports TensorFlow (which takes seconds), so
that what needs no TensorFlow to check fails at once, and so that TensorFlow's C++ start-up lines can be held back.
"""

import argparse
import atexit
import os
import re
import signal
import sys
import time

from absl import flags, logging

from research import UserError

# Lines TensorFlow's C++ runtime writes to stderr before its logging is initialised (so TF_CPP_MIN_LOG_LEVEL does
# not silence them), at import and when the first device is created: `WARNING: All log messages before
# absl::InitializeLog() ...`, and INFO records such as `I0000 00:00:1764... 1234 port.cc:153] oneDNN custom
# operations are on ...` or `cpu_feature_guard.cc:210] This TensorFlow binary is optimized ...`. Their warnings
# and errors (W/E/F records) still show, but for the kinds below.
TENSORFLOW_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\n"
    rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] "
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.\n"  # (Its 2nd line.)
    # TFDS's prepared graphs cause this one, harmlessly.
    rb"|E\d{4} [\d:. ]+ [\w.]+:\d+\] NodeDef mentions attribute \w+ which is not in the op definition"
    # An op's failure as its threads log it (a bad image file met by tf.data's parallel calls, one line each): the
    # program reports it in its own line, or raises it with its message.
    rb"|W\d{4} [\d:. ]+ (?:op_kernel|local_rendezvous)\.cc:\d+\] |\t \[\[.*\]\]\n"
    # libjpeg's own note on a JPEG it cannot decode, which the program reports as that file's error line.
    rb"|Improper call to JPEG library in state \d+\n"
    # The TFLite converter's and interpreter's notes on every conversion (research/tflite.py): nothing to act on.
    rb"|W\d{4} [\d:. ]+ [\w.]+:\d+\] (Ignored (output_format|drop_control_dependency)\.|Skipping runtime version "
    rb"metadata in the model\.)|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
    rb"output_inference_type: \w+\n|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\n")
INTERRUPTED = 128 + signal.SIGINT


_started = []


def start():
    """The first call of every program, before TensorFlow loads: stderr filtered, a Ctrl-C answered with one line.
    (Once: a package that starts its programs on import, research.data, may be imported by another program.)"""
    if _started:
        return
    _started.append(True)
    _filter_stderr()
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame):
    """Ctrl-C while modules load: nothing has been written yet, so stop at once rather than unwind half an import."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def _filter_stderr():
    """Routes this process's stderr (file descriptor 2, which C++ writes to as well) through a forked filter that
    drops TENSORFLOW_NOISE lines and passes everything else on, line by line.

    A separate process rather than a thread, so that whatever the program writes just before it crashes (a C++
    fatal error, say) still gets through: the filter reads until every writer has closed the pipe, and ignores the
    Ctrl-C that the program itself answers."""
    target = os.dup(2)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    filter_pid = os.fork()
    if filter_pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(write_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # Hold none of the program's other streams open.
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not TENSORFLOW_NOISE.match(line):
                    os.write(target, line)
        os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain():
        """At exit: close our end of the pipe and give the filter a moment to pass on the last lines, so they come
        before the shell's prompt (a child process that still holds the pipe is not waited for)."""
        sys.stderr.flush()
        os.dup2(target, 2)
        deadline = time.time() + 2
        while time.time() < deadline:
            try:
                if os.waitpid(filter_pid, os.WNOHANG) != (0, 0):
                    return
            except ChildProcessError:  # Already reaped.
                return
            time.sleep(0.01)

    atexit.register(drain)


def check_model_dir(model_dir):
    """Before TensorFlow loads: a local --model_dir that does not exist is one error line (a URL is checked later,
    through TensorFlow's filesystems)."""
    if "://" not in model_dir and not os.path.isdir(model_dir):
        fail(f"--model_dir={model_dir} " + ("is a file, not a run directory" if os.path.exists(model_dir) else
                                             "does not exist"))


def check_lasting(path, flag):
    """A program's output path on ram:// (TensorFlow's in-memory filesystem) is lost when the process exits: a
    UserError. (In-process callers, such as the tests, use it as a stand-in for object storage.)"""
    if path and str(path).startswith("ram://"):
        raise UserError(f"{flag}={path} is in memory (ram://) and would be lost when this program exits: give a "
                        "path on disk or a lasting filesystem (gs://, s3://, hdfs://)")


def before_tensorflow(check, *args):
    """Runs `check(*args)` where `run` does not yet catch (before TensorFlow loads): a UserError is one error line
    and exit status 2."""
    try:
        check(*args)
    except UserError as e:
        fail(e)


def fail(message):
    """One error line and exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(main, argv=None):
    """Calls `main(argv)` (returning an exit status or None): a UserError becomes its one line and exit status 2,
    a Ctrl-C one line and 130."""
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO chatter (saver callbacks) hides our output.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (`--help` still prints the usage)."""

    def error(self, message):
        raise UserError(message)


def run_tool_parser(prog, doc):
    """The command line of a tool that reads one run (evaluate, predict, export): --model_dir and --checkpoint, the
    same for all of them, before the tool's own arguments."""
    parser = Parser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="The run directory.")
    parser.add_argument("--checkpoint", default="latest",
                        help="latest, best, a directory of checkpoints, or a checkpoint prefix (RUN/ckpt-300).")
    return parser


def add_data_location(parser, purpose="the data"):
    """A tool's flags that say where a run's data is now, when it moved (research/runs.py's data_location)."""
    parser.add_argument("--dataset", help=f"folder:NEW_PLACE: where the run's folder dataset moved, for {purpose} "
                                          "(default: the run's).")
    parser.add_argument("--data_dir", help=f"TFDS data_dir of {purpose} (default: the run's).")
    parser.add_argument("--tfds_manual_dir", help="Source files to prepare that dataset from (default: the run's).")


def parse_args(parser, argv=None):
    """`parser.parse_args(argv)`, a mistake being one error line and exit status 2 (for use before `run`)."""
    try:
        return parser.parse_args(argv)
    except UserError as e:
        fail(e)


HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def parse_flags(argv, doc, known_only=False):
    """Parses absl flags from `argv` (flagfiles included); returns the arguments left after the program name.

    A mistake (unknown flag, bad value, missing flagfile, a line of a flagfile that is no flag) is one error line
    and exit status 2; `--help` prints `doc` and the flags and exits 0. `known_only` checks only the flags defined
    so far (before TensorFlow loads, some modules that define flags are not imported yet) and leaves the rest."""
    if any(arg in HELP for arg in argv[1:]):
        if known_only:
            return argv[1:]
        print(doc.strip() + "\n\n" + _flags_help(full="--helpfull" in argv))
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv, known_only=known_only)[1:]
    except flags.Error as e:
        fail(_flag_error(e))
    positional = [arg for arg in rest if not arg.startswith("-")]
    if positional:
        fail(f"unexpected argument {positional[0]!r}: flags are --name=value (one per line in a flagfile)")
    return rest


def _flags_help(full):
    """Our flags by module (every flag of the process with `full`, absl's and TensorFlow's too)."""
    by_module = flags.FLAGS.flags_by_module_dict()
    return "\n\n".join(flags.FLAGS.module_help(module) for module in sorted(by_module)
                        if full or module.startswith("research"))


def op_error_line(error):
    """A TensorFlow error's message as one line for an `error: ...` line: its first line, without the decorations
    graph execution adds (`{{function_node ...}}`, `[[{{node ...}}]]`, `[Op:...]`)."""
    first = ((getattr(error, "message", None) or str(error)).strip().splitlines() or [""])[0]
    return _undecorated(first)


def _undecorated(line):
    return re.sub(r"\{\{[^}]*\}\}\s*|\s*\[\[.*$|\s*\[Op:.*$", "", line)


def keras_error_line(error):
    """A Keras error's message as one line: its first line that is not Keras' preamble ("Exception encountered when
    calling ..."), without the terminal colours Keras adds nor the decorations of a TensorFlow error inside it."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()
             if line.strip() and not line.startswith("Exception encountered")]
    return _undecorated(lines[0]) if lines else str(error).strip() or type(error).__name__


def _flag_error(error):
    """absl's message, shorn of its decorations ('ERROR:: ', a trailing 'Pass --helpshort ...')."""
    message = str(error).strip().removeprefix("ERROR:: ")
    return message.splitlines()[0] if message else type(error).__name__
