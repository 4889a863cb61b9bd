"""`python tests/mock_train.py FLAGS...`: research.train on `tfds.testing.mock_data`, for subprocesses in tests.

TFDS cannot download here and `mock_data` patches TFDS only inside the process that enters it, so tests that launch
runs as subprocesses (sweeps) use this entry point in place of `python -m research.train`:
`python -m launch.sweep --train_command="python tests/mock_train.py" ...`. It mocks exactly what the `mock_tfds`
fixture of tests/conftest.py mocks: 64 random examples per split, read in memory or by index (`mock_records`), and
no offline-download guard.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run as a script from anywhere.

import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.testing import mocking  # noqa: E402

from research import train  # noqa: E402
from research.data import tfds_source  # noqa: E402

MOCK_EXAMPLES = 64


def mock_records(builder, split, **kwargs):
    """`builder.as_data_source` under mock_data: the serialized examples of one split (TFDS's own mock of it fails
    on the batched reads of `__getitems__`), random but the same in every process."""
    generator = mocking.RandomFakeGenerator(builder.info.features, MOCK_EXAMPLES, seed=sum(map(ord, str(split))))
    return [builder.info.features.serialize_example(generator[i]) for i in range(MOCK_EXAMPLES)]


def mocked():
    """The mock_data context of these tests."""
    return tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, as_data_source_fn=mock_records)


def main(argv):
    tfds_source.ensure_downloadable = lambda builder, manual_dir: None
    with mocked():
        return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
