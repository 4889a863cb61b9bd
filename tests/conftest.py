"""Shared fixtures: mocked TFDS datasets for fast tests, the real MNIST files for integration tests; the `slow`
marker.

Two tiers: `pytest -m "not slow"` is the fast one (minutes: the real loop on tiny mock data for every model family,
optimizer and augmentation op, from their registries), the whole suite adds the slow tests: real data (every test
that uses the real MNIST files, marked here by its fixture), subprocesses, kills and multi-worker runs, and the
longest in-process runs whose code the fast tier still trains on tiny data (every recipe flagfile, resume
equivalences, full-size models, the benchmark), each marked `@pytest.mark.slow` where it is defined."""

import fcntl
import os

import pytest
import tensorflow as tf

# Two logical CPUs, so MirroredStrategy tests can run two replicas on a CPU-only machine. Must precede any TF op.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from research import config as config_lib, data  # noqa: E402
from research.data import tfds_source  # noqa: E402
from mock_train import mocked  # noqa: E402

MNIST_FILES = os.environ.get(
    "MNIST_FILES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "mnist"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real data, subprocesses, kills, multi-worker or the longest runs (not "
                                       "in the fast tier, `-m 'not slow'`)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "mnist_data_dir" in item.fixturenames:  # Real data.
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def mock_tfds(monkeypatch):
    """`tfds.testing.mock_data` with 64 random examples per split (also read by index: mock_train.mock_records);
    downloads are no-ops under the mock, so the offline check that guards real downloads is switched off too."""
    monkeypatch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
    with mocked():
        yield


def train_mocked(config):
    """`research.trainer.train_and_evaluate(config)` under the mock of `mock_tfds`, for a module-scoped fixture: one
    run trained once that several tests only read (a function-scoped fixture cannot serve a module-scoped one)."""
    from research import trainer
    with pytest.MonkeyPatch.context() as patch, mocked():
        patch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
        return trainer.train_and_evaluate(config)


def make_config(model_dir, **overrides):
    """A small, fast configuration: a few steps of tiny batches, no figures (eval_figures=True where a test reads
    them: drawing them is a third of a tiny run's time)."""
    defaults = dict(model_dir=str(model_dir), dataset="mnist", model="mlp", hidden_units="16", batch_size=8,
                    train_steps=12, steps_per_loop=4, eval_every=8, checkpoint_every=4, optimizer="adam",
                    eval_figures=False)
    return config_lib.make_config(**{**defaults, **overrides})


FASHION_MNIST_FILES = os.environ.get(
    "FASHION_MNIST_FILES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "fashion_mnist"))


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
    """A TFDS data_dir with real MNIST prepared from ../shared/datasets/mnist (skips where the files are absent),
    shared by the tests of every worker: a test that changes files in it works on a copy."""
    if not os.path.exists(os.path.join(MNIST_FILES, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"real MNIST files not found in {MNIST_FILES} (set MNIST_FILES); CI always has them")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # Every worker of this test session: one preparation, not one each.
    data_dir = str(shared / "tfds_mnist")
    with open(shared / "tfds_mnist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # The first worker prepares; the others wait, then find it prepared.
        data.load(config_lib.make_config(model_dir="unused", train_steps=1, data_dir=data_dir,
                                         tfds_manual_dir=MNIST_FILES))
    return data_dir


@pytest.fixture
def shallow_models(monkeypatch):
    """Every vit_* two blocks deep, every resnet* one block a stage: each family's code whole, at a fraction of its
    tracing and training time, for tests about what surrounds a model (recipes, exports), not its size."""
    from research.models import resnet, vit
    for size, (width, _, heads) in list(vit.SIZES.items()):
        monkeypatch.setitem(vit.SIZES, size, (width, 2, heads))
    for depth, (bottleneck, _) in list(resnet.DEPTHS.items()):
        monkeypatch.setitem(resnet.DEPTHS, depth, (bottleneck, (1, 1, 1, 1)))
