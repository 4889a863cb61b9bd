"""The optimizer table (research/optim.py OPTIMIZERS): every optimizer through the real loop, the flags made from it,
and Lion's and LAMB's layer-wise rates and exact resume."""

import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, config as config_lib, models, optim, trainer
from test_resume import stop_resume_and_compare


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_trains_the_real_loop(mock_tfds, tmp_path, name):
    results = trainer.train_and_evaluate(make_config(tmp_path, optimizer=name, train_steps=2, steps_per_loop=1,
                                                     eval_every=2, checkpoint_every=2))
    assert results["step"] == 2 and np.isfinite(results["train"]["loss"]) and results["train"]["grad_norm"] > 0


def test_the_flags_are_made_from_the_table():
    assert all(name in config_lib.FLAGS["optimizer"].help for name in optim.OPTIMIZERS)
    with pytest.raises(UserError, match="--optimizer=adamm is unknown; choose from adam, adamax, adamw, lamb"):
        config_lib.make_config(model_dir="x", train_steps=1, optimizer="adamm")
    plain = dict(model_dir="x", train_steps=1, momentum="0.9", nesterov="true")
    for name, entry in optim.OPTIMIZERS.items():
        ignored = config_lib.ignored(config_lib.make_config(**plain, optimizer=name))
        assert [note.split("=")[0] for note in ignored] == [f"--{f}" for f in ("momentum", "nesterov")
                                                            if f not in entry.reads]
        config = config_lib.make_config(model_dir="x", train_steps=1, optimizer=name)
        optimizer = optim.create_optimizer(config, 10, tf.keras.Sequential())
        assert isinstance(optimizer, entry.keras_class) and optimizer.weight_decay == entry.weight_decay


def _one_step_with_layer_decay(name, decay=0.5, rate=0.01):
    """resnet_small's variables before and after one step of `name` under --layer_decay, and each one's scale."""
    config = make_config("unused", model="resnet_small", widths="4,8", optimizer=name, learning_rate=rate,
                         layer_decay=decay)
    model = models.create(config, types.SimpleNamespace(num_classes=10, image_shape=(8, 8, 1)))
    model(tf.zeros([1, 8, 8, 1]))
    optimizer = optim.create_optimizer(config, 10, model)
    optimizer.build(model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]
    gradients = [tf.random.stateless_normal(v.shape, [i, 0]) for i, v in enumerate(model.trainable_variables)]
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    scales = [optimizer.rate_scale(v) for v in model.trainable_variables]
    assert sorted(set(np.round(scales, 9))) == sorted(np.round([decay ** k for k in range(4)], 9))  # 2 blocks.
    return [(b, v.numpy(), rate * s) for b, v, s in zip(before, model.trainable_variables, scales)]


def test_lion_moves_each_weight_by_its_layers_rate():
    """Lion's first update is the rate times the gradient's sign: each variable moves by exactly its scaled rate."""
    for before, after, rate in _one_step_with_layer_decay("lion"):
        np.testing.assert_allclose(np.abs(before - after), rate, rtol=1e-3)


def test_lamb_moves_each_layer_by_its_rate_times_its_norm():
    """LAMB's trust ratio makes a variable's update norm its own norm times the rate: here its scaled rate."""
    for before, after, rate in _one_step_with_layer_decay("lamb"):
        if np.linalg.norm(before) > 0:  # (A zero variable, a batch-norm offset, has a trust ratio of 1.)
            assert np.linalg.norm(before - after) == pytest.approx(rate * np.linalg.norm(before), rel=1e-3)


@pytest.mark.slow  # Three runs of a ResNet each; the fast tier trains every optimizer through the loop above.
@pytest.mark.parametrize("name", ["lion", "lamb"])
def test_lion_and_lamb_with_layer_decay_resume_exactly(mock_tfds, tmp_path, name):
    """Stopped at step 3 (mid-loop, mid-epoch) and resumed to 6: bit-identical weights and optimizer slots."""
    flags = dict(model="resnet_small", widths="4,8", optimizer=name, layer_decay=0.7, weight_decay=0.01,
                 steps_per_loop=2, checkpoint_every=3, eval_every=6)
    stop_resume_and_compare(tmp_path, 3, 6, **flags)
