"""The augmentation ops (research/augment/), each from the registry: seeded the same eagerly and in Dataset.map,
changing the image as often as its probability says, through the real loop; cutout's and random erasing's holes,
RandAugment's operations, and erasing's exact resume."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import augment, trainer
from research.augment import randaugment

SHAPE = (28, 28, 1)
OPS = [op.name for op in augment.ops()]


def _digit():
    """A bright off-centre bar on grey, so every op visibly changes pixels (cutout too, wherever it lands)."""
    image = np.full(SHAPE, 0.2, np.float32)
    image[6:20, 9:12] = 1.0
    return tf.constant(image)


def _config(ops, **flags):
    return make_config("unused", augment=",".join(ops), **flags)


def _always(op):
    """The op's flags set so that it changes every image (its probability at 1)."""
    return {op.probability: "1"} if op.probability else {}


@pytest.mark.parametrize("name", OPS)
def test_each_op_changes_the_image_and_is_the_same_eagerly_and_in_dataset_map(name):
    [op] = [op for op in augment.ops() if op.name == name]
    config = _config([name], **_always(op))
    seeds = [[7, 1, i] for i in range(8)]
    eager = np.stack([augment.apply(config, _digit(), s).numpy() for s in seeds])
    mapped = np.stack(list(tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
        lambda s: augment.apply(config, _digit(), tf.unstack(s)), num_parallel_calls=4).as_numpy_iterator()))
    np.testing.assert_allclose(eager, mapped, atol=1e-6)
    assert eager.shape == (8, *SHAPE)
    changed = [not np.allclose(e, _digit().numpy()) for e in eager]
    assert sum(changed) >= (8 if op.probability else 3), f"{name} left the image alone for most seeds"
    assert len({e.tobytes() for e in eager}) > 1, f"{name} ignores its seed"
    if op.probability:  # At 0 it never changes an image; at 0.5 about half of them.
        never = _config([name], **{op.probability: "0"})
        assert all(np.array_equal(augment.apply(never, _digit(), s).numpy(), _digit().numpy()) for s in seeds)
        half = _config([name], **{op.probability: "0.5"})
        changed = sum(not np.array_equal(augment.apply(half, _digit(), [7, 2, i]).numpy(), _digit().numpy())
                      for i in range(200))
        assert 70 < changed < 130


@pytest.mark.parametrize("name", augment.names())
def test_every_op_trains_through_the_real_loop(mock_tfds, tmp_path, name):
    results = trainer.train_and_evaluate(make_config(tmp_path, augment=name, train_steps=2, steps_per_loop=1,
                                                     eval_every=2, checkpoint_every=2))
    assert results["step"] == 2 and np.isfinite(results["train"]["loss"])


def test_the_ops_apply_by_stage_and_every_op_keeps_its_own_seed():
    stages = [augment.STAGES.index(op.stage) for op in augment.ops()]
    assert stages == sorted(stages)
    streams = [op.stream for op in augment.ops()]
    assert len(set(streams)) == len(streams) and set(streams) == set(range(len(streams)))


def test_cutout_blanks_one_square_of_a_quarter_side():
    for seed in range(5):
        hole = augment.apply(_config(["cutout"]), tf.ones(SHAPE), [0, 0, seed]).numpy()[..., 0] == 0
        rows, cols = hole.any(axis=1).sum(), hole.any(axis=0).sum()
        assert 0 < hole.sum() == rows * cols and rows <= 7 and cols <= 7  # One rectangle, clipped at the border.


def test_erase_fills_one_rectangle_of_timms_areas_and_aspects_with_noise():
    config = _config(["erase"], erase_prob="1")
    areas = []
    for seed in range(40):
        erased = augment.apply(config, -tf.ones([32, 32, 3]), [0, 0, seed]).numpy()  # Noise is in [0, 1).
        hole = np.all(erased >= 0, axis=-1)
        rows, cols = hole.any(axis=1).sum(), hole.any(axis=0).sum()
        assert hole.sum() == rows * cols and rows < 32 and cols < 32  # One rectangle inside the image.
        if hole.any():
            assert 0.3 / 1.6 <= rows / cols <= 3.3 * 1.6  # (Rounded to whole pixels.)
            assert erased[hole].std() > 0.2  # Per-pixel uniform noise, not a constant.
        areas.append(hole.sum() / 32 ** 2)
    assert 0.015 < min(areas) and max(areas) < 0.4 and np.mean(areas) > 0.1


@pytest.mark.parametrize("op", randaugment.OPS)
def test_each_randaugment_op_changes_the_image_and_stays_in_range(op):
    out = randaugment._op(op, _photo(), 1.0, tf.constant(1.0)).numpy()
    assert out.shape == (16, 16, 3) and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out, _photo().numpy(), atol=1e-3), f"{op} left the image alone at magnitude 10"


def _photo(size=16):
    """A colour image with gradients and a bright square, in [0.1, 0.8], so every RandAugment op changes it."""
    ramp = np.linspace(0.1, 0.8, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    image[4:9, 5:10] = [0.8, 0.7, 0.1]
    return tf.constant(image)


def test_randaugment_reads_its_flags_and_is_seeded_the_same_eagerly_and_in_dataset_map():
    config = _config(["randaugment", "flip"], randaugment_num_ops="3", randaugment_magnitude="9")
    seeds = [[5, 2, i] for i in range(12)]
    eager = np.stack([augment.apply(config, _photo(), s).numpy() for s in seeds])
    mapped = np.stack(list(tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
        lambda s: augment.apply(config, _photo(), tf.unstack(s)), num_parallel_calls=4).as_numpy_iterator()))
    np.testing.assert_allclose(eager, mapped, atol=1e-6)
    assert len({e.tobytes() for e in eager}) > 6  # Seeds choose different ops.
    np.testing.assert_array_equal(augment.apply(config, _photo(), seeds[0]).numpy(), eager[0])
    weaker = _config(["randaugment", "flip"], randaugment_num_ops="3", randaugment_magnitude="2")
    weak = np.stack([augment.apply(weaker, _photo(), s).numpy() for s in seeds])
    assert not np.array_equal(weak, eager)  # The same ops drawn, at another magnitude.


@pytest.mark.slow
def test_erase_resumes_exactly(mock_tfds, tmp_path):
    """6 steps with random erasing in one go, and 3 + 3 with a resume between: the same weights, bit for bit."""
    run = dict(augment="erase", erase_prob="0.5", deterministic=True, eval_every=6, checkpoint_every=3)
    trainer.train_and_evaluate(make_config(tmp_path / "whole", train_steps=6, **run))
    trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=3, **run))
    trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=6, **run))
    whole, resumed = (tf.train.load_checkpoint(str(tmp_path / d / "ckpt-6")) for d in ("whole", "resumed"))
    for name in whole.get_variable_to_shape_map():
        if name.startswith("model_variables/"):
            np.testing.assert_array_equal(whole.get_tensor(name), resumed.get_tensor(name))
