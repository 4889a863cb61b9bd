"""Large batches: gradient accumulation, one gradient all-reduce per step, synchronised batch norm, stochastic
depth for ResNets; every one of them resumes exactly."""

import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, benchmark, config as config_lib, data, distribute, models, train_lib


@pytest.fixture(autouse=True)
def float32_policy():
    """train_lib.build sets the global precision policy; models built directly afterwards must not inherit it."""
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def _train(config, strategy=None):
    """(model, [loss, correct, examples, grad norm] summed over the steps) after config.train_steps steps of the real
    loop on the real input pipeline (mock_tfds), without evaluations or checkpoints."""
    dataset = data.load(config)
    strategy = strategy or distribute.create_strategy(config)
    _, total_steps = train_lib.run_length(config, dataset, strategy)
    model, optimizer, step, ema = train_lib.build(config, dataset, strategy, total_steps)
    train_loop = train_lib.make_train_loop(strategy, model, optimizer, step, config, ema)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_input_fn(dataset, config, 0)))
    totals, steps_run, finite = train_loop(iterator, tf.constant(config.train_steps))
    assert int(steps_run) == config.train_steps and bool(finite)
    return model, totals.numpy()


def _assert_close(a, b, **tolerance):
    assert len(a.variables) == len(b.variables)
    for x, y in zip(a.variables, b.variables):
        np.testing.assert_allclose(x.numpy(), y.numpy(), err_msg=x.path, **tolerance)


@pytest.mark.parametrize("strategy, micro_batches", [("default", 4), ("mirrored", 2)])
def test_accumulated_micro_batches_train_as_one_batch(mock_tfds, tmp_path, strategy, micro_batches):
    """No batch statistics (mlp): K micro-batches of B/K give the update of one batch of B, and the same loss,
    accuracy, example count and gradient norm; with clipping and label smoothing, on each replica's share."""
    flags = dict(strategy=strategy, train_steps=3, clip_grad_norm=0.5, label_smoothing=0.1, batch_size=16)
    whole, whole_totals = _train(make_config(tmp_path, **flags))
    accumulated, totals = _train(make_config(tmp_path, grad_accum_steps=micro_batches, **flags))
    _assert_close(whole, accumulated, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(totals, whole_totals, rtol=1e-5)
    assert totals[2] == 3 * 16  # Examples: every one counted once.


def test_micro_batches_must_split_the_batch_evenly(mock_tfds, tmp_path):
    with pytest.raises(UserError, match=r"--batch_size=8 does not split into --grad_accum_steps=3 equal"):
        make_config(tmp_path, grad_accum_steps=3)
    with pytest.raises(UserError, match="--grad_accum_steps must be positive"):
        make_config(tmp_path, grad_accum_steps=0)
    with pytest.raises(UserError, match=r"--batch_size=12 does not split into 2 replicas x --grad_accum_steps=4"):
        _train(make_config(tmp_path, batch_size=12, grad_accum_steps=4, strategy="mirrored"))


class CountingReduction(tf.distribute.ReductionToOneDevice):
    """MirroredStrategy's CPU all-reduce, recording the shape of every value it reduces (at trace time; its batched
    form reduces each value through reduce_implementation)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
        self.shapes.append(tuple(per_replica_value.values[0].shape))
        return super().reduce_implementation(reduce_op, per_replica_value, destinations, options)


def _mirrored_loop(tmp_path, **flags):
    """(strategy's CountingReduction, model, optimizer, train_loop, iterator) of an mlp on 8x8 synthetic images."""
    counting = CountingReduction()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=counting)
    config = make_config(tmp_path, optimizer="sgd", momentum=0.9, **flags)
    dataset = benchmark.synthetic_dataset(config, 8, 10)
    model, optimizer, step, ema = train_lib.build(config, dataset, strategy, 100)
    train_loop = train_lib.make_train_loop(strategy, model, optimizer, step, config, ema)
    return counting, model, optimizer, train_loop, iter(strategy.distribute_datasets_from_function(dataset.input_fn))


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_one_gradient_all_reduce_per_step(tmp_path, precision):
    """Each gradient is all-reduced once per step, for clipping and update alike (Keras' apply_gradients would sum
    it again); with accumulation too, and the loss scaler of mixed_float16 included."""
    counting, model, _, train_loop, iterator = _mirrored_loop(tmp_path, mixed_precision=precision, grad_accum_steps=2,
                                                              clip_grad_norm=1.0)
    train_loop.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
    assert sorted(counting.shapes) == sorted(tuple(v.shape) for v in model.trainable_variables)


@pytest.mark.slow
def test_mirrored_loss_scaling_skips_an_overflow_step_and_applies_the_next(tmp_path):
    _, model, optimizer, train_loop, iterator = _mirrored_loop(tmp_path, mixed_precision="mixed_float16")
    before = [v.numpy() for v in model.trainable_variables]
    optimizer.dynamic_scale.assign(2.0 ** 120)  # float16 gradients overflow.
    train_loop(iterator, tf.constant(1))
    assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 119
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    optimizer.dynamic_scale.assign(2.0 ** 10)
    _, steps_run, finite = train_loop(iterator, tf.constant(1))
    assert bool(finite) and not any(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


@pytest.mark.slow
def test_sync_batchnorm_makes_two_replicas_train_as_one_device(mock_tfds, tmp_path):
    """The same global batches: with synchronised batch norm two replicas (each normalising its half of a batch by
    the statistics of all of it) train as one device does; without, each half has its own statistics."""
    flags = dict(model="resnet_small", widths="4", train_steps=2, optimizer="sgd", learning_rate=0.1)
    one_device, _ = _train(make_config(tmp_path, strategy="one_device", sync_batchnorm=True, **flags))
    mirrored, _ = _train(make_config(tmp_path, strategy="mirrored", sync_batchnorm=True, **flags))
    _assert_close(one_device, mirrored, rtol=1e-4, atol=1e-5)
    per_replica, _ = _train(make_config(tmp_path, strategy="mirrored", **flags))
    with pytest.raises(AssertionError):
        _assert_close(one_device, per_replica, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_under_xla_on_mirrored_cpus_is_one_error_line(mock_tfds, tmp_path):
    with pytest.raises(UserError, match="--sync_batchnorm with --jit_compile needs GPU replicas"):
        _train(make_config(tmp_path, model="convnet", conv_layers="4c3s2", strategy="mirrored", sync_batchnorm=True,
                           jit_compile=True))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet_small", "resnet18", "convnet"])
def test_sync_batchnorm_reaches_every_batch_norm_layer(model):
    def batch_norms(sync):
        config = config_lib.make_config(model_dir="unused", train_steps=1, model=model, sync_batchnorm=sync)
        network = models.create(config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10))
        network(tf.zeros([1, 32, 32, 3]))
        return [layer for layer in network._flatten_layers() if isinstance(layer, tf.keras.layers.BatchNormalization)]

    assert batch_norms(True) and all(layer.synchronized for layer in batch_norms(True))
    assert not any(layer.synchronized for layer in batch_norms(False))


def test_resnet_stochastic_depth_drops_residual_branches_at_linearly_rising_seeded_rates():
    config = config_lib.make_config(model_dir="unused", train_steps=1, model="resnet18", stochastic_depth=0.5,
                                    zero_init_residual=False)
    assert config_lib.ignored(config) == []  # --stochastic_depth has an effect on ResNets ...
    assert config_lib.ignored(config_lib.make_config(model_dir="unused", train_steps=1, stochastic_depth=0.5)) == [
        "--stochastic_depth=0.5 (only with a model that has residual branches to drop)"]  # ... not on the default cnn.
    model = models.create(config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10))
    images = tf.random.stateless_normal([8, 32, 32, 3], [1, 2])
    inference = model(images).numpy()
    assert [0.0 if block.drop is None else block.drop.rate for block in model.blocks] == pytest.approx(
        [0.5 * i / 7 for i in range(8)])
    seed_states = [v for v in model.variables if "seed_generator_state" in v.path]
    assert len(seed_states) == 7  # One seeded Dropout per block but the first: in the checkpoint, for resume.
    np.testing.assert_array_equal(model(images).numpy(), inference)
    trained = [model(images, training=True).numpy() for _ in range(2)]
    assert not np.allclose(trained[0], trained[1])  # Masks drawn anew at every call.

