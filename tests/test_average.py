"""research.average: the averaged checkpoint holds the mean of every float variable (batch-norm statistics too) of
the checkpoints chosen, and the tools read it like any other."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config, train_mocked
from research import average, evaluate, fs, run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A convnet with batch norm: checkpoints at steps 4, 8 and 12, evaluations at 8 and 12 (the tests add only
    averages, in its average/ directory)."""
    model_dir = tmp_path_factory.mktemp("average") / "run"
    train_mocked(make_config(model_dir, model="convnet", conv_layers="4c3s2v,8c3v"))
    return str(model_dir)


def _model_variables(path):
    reader = tf.train.load_checkpoint(path)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith("model_variables/") and key.endswith("VARIABLE_VALUE")}


def test_average_of_the_last_checkpoints_and_of_the_best(run, mock_tfds, capsys):
    assert average.main(["--model_dir", run, "--last", "2"]) == 0
    assert "the average of 2 checkpoints (ckpt-12, ckpt-8)" in capsys.readouterr().out
    averaged = _model_variables(fs.join(run, "average", "ckpt-12"))
    sources = [_model_variables(fs.join(run, f"ckpt-{step}")) for step in (8, 12)]
    moving = [key for key in averaged if not np.array_equal(sources[0][key], sources[1][key])]
    assert averaged.keys() == sources[0].keys() and len(moving) > 8  # Kernels, biases and the moving statistics.
    for key, value in averaged.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(value, (sources[0][key] + sources[1][key]) / 2, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(value, sources[1][key])
    report = evaluate.evaluate(run, checkpoint=fs.join(run, "average"))
    assert report["checkpoint"].endswith("average/ckpt-12") and report["examples"] == 64

    best = run_dir.read_best(run)
    assert average.main(["--model_dir", run, "--best", "1"]) == 0
    for key, value in _model_variables(fs.join(run, "average", f"ckpt-{best['step']}")).items():
        np.testing.assert_array_equal(value, _model_variables(fs.join(run, f"ckpt-{best['step']}"))[key])


@pytest.mark.parametrize("argv, message", [
    (["--last", "0"], "--last must be a positive number of checkpoints, got 0"),
    (["--last", "4"], "--last=4: RUN has only 3 kept checkpoints"),
    (["--best", "3"], "--best=3: RUN has only 2 kept checkpoints evaluated on test"),
    (["--last", "1", "--best", "1"], "argument --best: not allowed with argument --last"),
    ([], "one of the arguments --last --best is required"),
])
def test_average_mistakes_are_one_line(run, capsys, argv, message):
    assert average.main(["--model_dir", run, *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message.replace('RUN', run)}"
