"""Recipe features: the data stream as a function of (seed, step), augmented or not, EMA, global-norm clipping;
mixup/cutmix with soft targets, and weight decay that skips biases and norms. (The augmentation ops themselves:
tests/test_augment.py.)"""

import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import data, distribute, mix, models, optim, train_lib, trainer

SHAPE = (28, 28, 1)


def _dataset(n=64):
    rng = np.random.RandomState(0)
    return data.in_memory("mnist", [str(i) for i in range(10)],
                          (rng.randint(0, 256, (n, *SHAPE)).astype(np.uint8), rng.randint(0, 10, n).astype(np.int64)),
                          (rng.randint(0, 256, (16, *SHAPE)).astype(np.uint8), rng.randint(0, 10, 16).astype(np.int64)))


def _batches(dataset, config, start_step, count):
    ds = data.train_input_fn(dataset, config, start_step)(tf.distribute.InputContext())
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


@pytest.mark.parametrize("augmentation", ["", "translate,rotate,zoom,crop,cutout,erase"])
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
    ema = train_lib.WeightAverage([v], decay=0.99)
    v.assign([3.0, 4.0])
    ema.update(tf.constant(1, tf.int64))  # decay = min(0.99, 2/11)
    expected = 2 / 11 * np.array([1.0, 2.0]) + 9 / 11 * np.array([3.0, 4.0])
    np.testing.assert_allclose(ema.average[0].numpy(), expected, rtol=1e-6)
    with ema.swapped_in():
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), [3.0, 4.0])


def test_ema_weights_are_checkpointed_and_evaluated(mock_tfds, tmp_path):
    results = trainer.train_and_evaluate(make_config(tmp_path, ema_decay=0.5, optimizer="sgd", learning_rate=0.5))
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-12"))
    names = reader.get_variable_to_shape_map()
    assert sorted(n for n in names if n.startswith("ema/"))[-1] == "ema/3/.ATTRIBUTES/VARIABLE_VALUE"  # 4 weights.
    average, kernel = (reader.get_tensor(f"{n}/2/.ATTRIBUTES/VARIABLE_VALUE") for n in ("ema", "model_variables"))
    assert average.shape == kernel.shape and not np.allclose(average, kernel)
    # Evaluation used the averaged weights: the raw weights give another loss on the same data.
    raw = trainer.train_and_evaluate(make_config(tmp_path / "raw", optimizer="sgd", learning_rate=0.5))
    assert results["eval"]["loss"] != raw["eval"]["loss"]


def test_gradient_is_clipped_on_the_norm_summed_over_replicas():
    """Two replicas, SGD with rate 1: one step moves the weights by exactly the clip norm. Clipping each replica's
    gradient separately (Keras' clipnorm under tf.distribute) would move them by up to twice that."""
    config = make_config("x", model="mlp", hidden_units="16", batch_size=16, optimizer="sgd", learning_rate=1.0,
                         clip_grad_norm=1e-3, strategy="mirrored")
    strategy = distribute.create_strategy(config)
    dataset = _dataset()
    with strategy.scope():
        model = models.create(config, dataset)
        model(tf.zeros([1, *SHAPE]))
        optimizer = optim.create_optimizer(config, 10, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
    assert strategy.num_replicas_in_sync == 2
    before = [v.numpy() for v in model.trainable_variables]
    loop = train_lib.make_train_loop(strategy, model, optimizer, step, config)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_input_fn(dataset, config, 0)))
    totals, steps_run, finite = loop(iterator, tf.constant(1))
    moved = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(model.trainable_variables, before)))
    assert bool(finite) and int(steps_run) == 1
    assert moved == pytest.approx(1e-3, rel=1e-3)
    assert totals.numpy()[3] > 1e-3  # The reported norm is the unclipped global one.


# ---------------------------------------------------------------------------------------------- ImageNet-scale
@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_sum_to_one_match_the_images_and_are_seeded(mixup_alpha, cutmix_alpha):
    images = tf.random.stateless_uniform([8, 8, 8, 3], [0, 1])
    labels = tf.constant([0, 1, 2, 3, 4, 5, 6, 7], tf.int64)
    seed = mix.batch_seed(0, 5, 0)
    mixed, targets = mix.mix(images, labels, 10, mixup_alpha, cutmix_alpha, seed)
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, rtol=1e-6)
    weight = targets.numpy()[0, 0]  # Example 0 is blended with example 7 (the batch rolled by one).
    np.testing.assert_allclose(targets.numpy()[0, 7], 1.0 - weight, rtol=1e-5)
    partner = tf.roll(images, 1, axis=0).numpy()
    if cutmix_alpha and not mixup_alpha:  # Every pixel is its own or its partner's; the partner's share is 1 - w.
        from_partner = np.all(mixed.numpy() == partner, axis=-1) & ~np.all(mixed.numpy() == images.numpy(), axis=-1)
        assert from_partner[0].mean() == pytest.approx(1.0 - weight, abs=1e-6)
    if mixup_alpha and not cutmix_alpha:
        np.testing.assert_allclose(mixed.numpy(), weight * images.numpy() + (1 - weight) * partner, atol=1e-6)
    mapped = next(iter(tf.data.Dataset.from_tensors((images, labels)).map(
        lambda x, y: mix.mix(x, y, 10, mixup_alpha, cutmix_alpha, seed))))
    np.testing.assert_array_equal(mapped[0].numpy(), mixed.numpy())
    np.testing.assert_array_equal(mapped[1].numpy(), targets.numpy())
    other = mix.mix(images, labels, 10, mixup_alpha, cutmix_alpha, mix.batch_seed(0, 6, 0))[1]
    assert not np.array_equal(other.numpy(), targets.numpy())


@pytest.mark.slow
def test_mixed_training_resumes_exactly(mock_tfds, tmp_path):
    """8 steps with mixup and cutmix in one go, and 4 + 4 with a resume between: the same weights, bit for bit."""
    run = dict(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1, deterministic=True, eval_every=4)
    trainer.train_and_evaluate(make_config(tmp_path / "whole", train_steps=8, **run))
    trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=4, **run))
    trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=8, **run))
    trainer.train_and_evaluate(make_config(tmp_path / "unmixed", train_steps=8, deterministic=True, eval_every=4))
    whole, resumed, unmixed = (tf.train.load_checkpoint(str(tmp_path / d / "ckpt-8"))
                               for d in ("whole", "resumed", "unmixed"))
    names = [n for n in whole.get_variable_to_shape_map() if n.startswith("model_variables/")]
    for name in names:
        np.testing.assert_array_equal(whole.get_tensor(name), resumed.get_tensor(name))
    assert any(not np.array_equal(whole.get_tensor(n), unmixed.get_tensor(n)) for n in names)


def test_soft_targets_and_label_smoothing_in_the_loss():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = tf.constant([0, 2])
    one_hot = tf.one_hot(labels, 3)
    np.testing.assert_allclose(optim.per_example_loss(one_hot, logits), optim.per_example_loss(labels, logits),
                               rtol=1e-6)
    smoothed = one_hot * 0.9 + 0.1 / 3
    expected = -tf.reduce_sum(smoothed * tf.nn.log_softmax(logits), -1)
    np.testing.assert_allclose(optim.per_example_loss(one_hot, logits, 0.1), expected, rtol=1e-6)
    np.testing.assert_allclose(optim.per_example_loss(labels, logits, 0.1), expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit_ti16"])
def test_weight_decay_skips_biases_norms_and_position_embeddings(name):
    config = make_config("x", model=name, optimizer="sgd", learning_rate=1.0, weight_decay=0.5,
                         exclude_bias_and_norm_from_weight_decay=True)
    model = models.create(config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10))
    model(tf.zeros([1, 32, 32, 3]))
    exempt = {id(v) for v in optim.weight_decay_exempt(model)}
    for v in model.trainable_variables:
        assert (id(v) in exempt) == (len(v.shape) <= 1 or v.name in ("position_embedding", "class_token")), v.path
    optimizer = optim.create_optimizer(config, 10, model)
    optimizer.build(model.trainable_variables)
    for v in model.trainable_variables:
        v.assign(tf.ones_like(v))
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])  # Decay alone.
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy(), 1.0 if id(v) in exempt else 0.5, err_msg=v.path)
