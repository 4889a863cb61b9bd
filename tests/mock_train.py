"""`python tests/mock_train.py FLAGS...`: research.train on `tfds.testing.mock_data`, for subprocesses in tests.

TFDS cannot download here and `mock_data` patches TFDS only inside the process that enters it, so tests that launch
runs as subprocesses (sweeps) use this entry point in place of `python -m research.train`:
`python -m launch.sweep --train_command="python tests/mock_train.py" ...`. It mocks exactly what the `mock_tfds`
fixture of tests/conftest.py mocks: 64 random examples per split, and no offline-download guard.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script from anywhere.

import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402

from research import train  # noqa: E402
from research.data import tfds_source  # noqa: E402


def main(argv):
    tfds_source.ensure_downloadable = lambda builder, manual_dir: None
    with tfds.testing.mock_data(num_examples=64):
        train.main(argv)


if __name__ == "__main__":
    app.run(main)
