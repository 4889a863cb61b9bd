"""What the run tools (research.evaluate, .predict, .export) share on the command line: every mistake, a bad
argument included, is one `error: ...` line on stderr and exit status 2, never a usage dump or a traceback."""

import argparse
import sys

from absl import logging

from research import UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (`--help` still prints the usage)."""

    def error(self, message):
        raise UserError(message)


def run(main, argv=None):
    """Calls `main(argv)` (returning an exit status or None) and turns a UserError into its one line and 2."""
    logging.set_verbosity(logging.WARNING)  # As research.train: TensorFlow's INFO chatter hides the output.
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
