"""Recipe features: seeded augmentation, the data stream as a function of (seed, step), EMA, global-norm clipping."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import augment, data, models, optim, train

SHAPE = (28, 28, 1)


def _digit():
    """A bright off-centre bar on grey, so every op visibly changes pixels (cutout too, wherever it lands)."""
    image = np.full(SHAPE, 0.2, np.float32)
    image[6:20, 9:12] = 1.0
    return tf.constant(image)


def _dataset(n=64):
    rng = np.random.RandomState(0)
    return data.in_memory("mnist", [str(i) for i in range(10)],
                          (rng.randint(0, 256, (n, *SHAPE)).astype(np.uint8), rng.randint(0, 10, n).astype(np.int64)),
                          (rng.randint(0, 256, (16, *SHAPE)).astype(np.uint8), rng.randint(0, 10, 16).astype(np.int64)))


@pytest.mark.parametrize("op", augment.OPS)
def test_each_op_changes_the_image_and_is_the_same_eagerly_and_in_dataset_map(op):
    ops = augment.parse([op], SHAPE)
    seeds = [[7, 1, i] for i in range(8)]
    eager = np.stack([augment.apply(ops, _digit(), s).numpy() for s in seeds])
    mapped = np.stack(list(tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
        lambda s: augment.apply(ops, _digit(), tf.unstack(s)), num_parallel_calls=4).as_numpy_iterator()))
    np.testing.assert_allclose(eager, mapped, atol=1e-6)
    assert eager.shape == (8, *SHAPE)
    changed = [not np.allclose(e, _digit().numpy()) for e in eager]
    assert sum(changed) >= 3, f"{op} left the image alone for most seeds"
    assert len({e.tobytes() for e in eager}) > 1, f"{op} ignores its seed"


def test_cutout_blanks_one_square_of_a_quarter_side():
    for seed in range(5):
        hole = augment.apply(augment.parse(["cutout"], SHAPE), tf.ones(SHAPE), [0, 0, seed]).numpy()[..., 0] == 0
        rows, cols = hole.any(axis=1).sum(), hole.any(axis=0).sum()
        assert 0 < hole.sum() == rows * cols and rows <= 7 and cols <= 7  # One rectangle, clipped at the border.


def _batches(dataset, config, start_step, count):
    ds = data.train_input_fn(dataset, config, start_step)(tf.distribute.InputContext())
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


@pytest.mark.parametrize("augmentation", ["", "translate,rotate,zoom,crop,cutout"])
def test_the_batch_stream_is_a_function_of_seed_and_step(augmentation):
    """Resuming at any step (mid-epoch or across epochs) yields exactly the batches an unbroken stream has there."""
    dataset, config = _dataset(), make_config("x", batch_size=8, augment=augmentation)  # 8 steps an epoch.
    unbroken = _batches(dataset, config, 0, 20)
    for start in (3, 8, 13):
        for (x, y), (rx, ry) in zip(unbroken[start:], _batches(dataset, config, start, 20 - start)):
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)
    epoch_labels = [np.sort(np.concatenate([y for _, y in unbroken[e * 8:(e + 1) * 8]])) for e in (0, 1)]
    np.testing.assert_array_equal(epoch_labels[0], np.sort(dataset.train.labels))  # Each example once an epoch...
    assert not np.array_equal(unbroken[0][1], unbroken[8][1])  # ...in a new order each epoch.
    other_seed = _batches(dataset, make_config("x", batch_size=8, augment=augmentation, seed=1), 0, 1)
    assert not np.array_equal(other_seed[0][0], unbroken[0][0])


def test_weight_average_ramps_up_and_swaps_back():
    v = tf.Variable([1.0, 2.0])
    ema = train.WeightAverage([v], decay=0.99)
    v.assign([3.0, 4.0])
    ema.update(tf.constant(1, tf.int64))  # decay = min(0.99, 2/11)
    expected = 2 / 11 * np.array([1.0, 2.0]) + 9 / 11 * np.array([3.0, 4.0])
    np.testing.assert_allclose(ema.average[0].numpy(), expected, rtol=1e-6)
    with ema.swapped_in():
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), [3.0, 4.0])


def test_ema_weights_are_checkpointed_and_evaluated(mock_tfds, tmp_path):
    results = train.train_and_evaluate(make_config(tmp_path, ema_decay=0.5, optimizer="sgd", learning_rate=0.5))
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-12"))
    names = reader.get_variable_to_shape_map()
    assert sorted(n for n in names if n.startswith("ema/"))[-1] == "ema/3/.ATTRIBUTES/VARIABLE_VALUE"  # 4 weights.
    average, kernel = (reader.get_tensor(f"{n}/2/.ATTRIBUTES/VARIABLE_VALUE") for n in ("ema", "model_variables"))
    assert average.shape == kernel.shape and not np.allclose(average, kernel)
    # Evaluation used the averaged weights: the raw weights give another loss on the same data.
    raw = train.train_and_evaluate(make_config(tmp_path / "raw", optimizer="sgd", learning_rate=0.5))
    assert results["eval"]["loss"] != raw["eval"]["loss"]


def test_gradient_is_clipped_on_the_norm_summed_over_replicas():
    """Two replicas, SGD with rate 1: one step moves the weights by exactly the clip norm. Clipping each replica's
    gradient separately (Keras' clipnorm under tf.distribute) would move them by up to twice that."""
    config = make_config("x", model="mlp", hidden_units="16", batch_size=16, optimizer="sgd", learning_rate=1.0,
                         clip_grad_norm=1e-3, strategy="mirrored")
    strategy = train.distribute.create_strategy(config)
    dataset = _dataset()
    with strategy.scope():
        model = models.create(config, dataset)
        model(tf.zeros([1, *SHAPE]))
        optimizer = optim.create_optimizer(config, 10)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
    assert strategy.num_replicas_in_sync == 2
    before = [v.numpy() for v in model.trainable_variables]
    loop = train.make_train_loop(strategy, model, optimizer, step, config)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_input_fn(dataset, config, 0)))
    totals, steps_run, finite = loop(iterator, tf.constant(1))
    moved = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(model.trainable_variables, before)))
    assert bool(finite) and int(steps_run) == 1
    assert moved == pytest.approx(1e-3, rel=1e-3)
    assert totals.numpy()[3] > 1e-3  # The reported norm is the unclipped global one.
