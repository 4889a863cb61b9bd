"""`python tests/mock_evaluate.py FLAGS...`: research.evaluate on `tfds.testing.mock_data` (the data
tests/mock_train.py trains on), for subprocesses in tests, such as a `--follow` sidecar beside a mocked training."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script from anywhere.

from mock_train import mocked  # noqa: E402
from research import evaluate  # noqa: E402
from research.data import tfds_source  # noqa: E402


def main(argv):
    tfds_source.ensure_downloadable = lambda builder, manual_dir: None
    with mocked():
        return evaluate.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
