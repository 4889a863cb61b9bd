"""Input pipelines for `strategy.distribute_datasets_from_function`: the batch stream as a function of (seed, step).

Why: a distributed iterator cannot be checkpointed, and a shuffle buffer would put the data into checkpoints; so
nothing of the data is saved and a resumed run rebuilds its stream at the step it restored. Epoch e visits the
training split in the order of a stateless random bijection of (seed, e) (`RandomIndexShuffle`: the example at
position i is computed on its own, so resuming anywhere costs nothing and no epoch needs O(N) work or memory).
Step s is positions [s*G, (s+1)*G) of epoch s // steps_per_epoch (G the global batch; the remainder of an epoch
is dropped); position i goes to input pipeline i % num_pipelines, which reads only its own examples, by index,
from the source (research/data/sources.py), then decodes and preprocesses them in parallel, deterministically
(research/data/preprocess.py). The global batch of a step is the same for any number of replicas or workers.
"""


import numpy as np
import tensorflow as tf

from research import UserError
from research.data import preprocess

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_SALT = 0x0DE5  # Third word of the permutation's seed, (seed, epoch, salt).
EXPORT_BATCH = 256


def steps_per_epoch(dataset, config):
    return dataset.num_train // config.batch_size


def epoch_order(positions, seed, epoch, num_examples):
    """The examples at `positions` (int64 [n]) of epoch `epoch`'s permutation of range(num_examples)."""
    seeds = tf.broadcast_to(tf.cast(tf.stack([seed, epoch, SHUFFLE_SALT]), tf.int64), [tf.size(positions), 3])
    return tf.raw_ops.RandomIndexShuffle(index=positions, seed=seeds,
                                         max_index=tf.constant(num_examples - 1, tf.int64), rounds=4)


def _step_share(step, config, num_examples, per_epoch, pipelines, pipeline_id):
    """(epoch, positions, example indices) of this pipeline's share of the global batch of `step`."""
    global_batch = config.batch_size
    epoch = step // per_epoch
    first = (step % per_epoch) * global_batch
    positions = tf.range(first + pipeline_id, first + global_batch, pipelines, dtype=tf.int64)
    return epoch, positions, epoch_order(positions, config.seed, epoch, num_examples)


def train_input_fn(dataset, config, start_step):
    """This pipeline's endless per-replica batches (model inputs, labels) from `start_step` on."""
    per_epoch = steps_per_epoch(dataset, config)
    source, transform = dataset.train, dataset.transform(config)

    def input_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(config.batch_size)
        read = source.reader()

        def share(step):
            epoch, positions, indices = _step_share(step, config, len(source), per_epoch, ctx.num_input_pipelines,
                                                    ctx.input_pipeline_id)
            images, labels = read(indices)
            return tf.fill(tf.shape(positions), epoch), positions, images, labels

        ds = tf.data.Dataset.range(start_step, 2**62).map(share, num_parallel_calls=AUTOTUNE).unbatch()
        if transform.per_example or source.encoded:
            ds = ds.map(lambda epoch, position, image, label: (
                transform.train_example(source.fetch(image), source.encoded, [config.seed, epoch, position]), label),
                num_parallel_calls=AUTOTUNE).batch(per_replica, drop_remainder=True)
        else:
            ds = ds.batch(per_replica, drop_remainder=True).map(
                lambda epoch, position, images, labels: (transform.train_batch(images), labels),
                num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(options())

    return input_fn


def eval_input_fn(dataset, config, indices=None):
    """Every eval example exactly once across all pipelines (or those at `indices`), as (model inputs, labels,
    example indices): the index is where evaluation files each example's prediction. The last batch may be partial
    (or empty on a replica)."""
    source, transform = dataset.eval, dataset.transform(config)

    def input_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(config.batch_size)
        ds = tf.data.Dataset.range(len(source)) if indices is None else \
            tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
        read = source.reader()
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id).batch(per_replica).map(
            lambda at: (*read(at), at), num_parallel_calls=AUTOTUNE)
        if source.encoded or not transform.stored_at_size or transform.prep.eval_crop_fraction is not None:
            ds = ds.unbatch().map(lambda image, label, at: (
                transform.eval_example(source.fetch(image), source.encoded), label, at),
                num_parallel_calls=AUTOTUNE).batch(per_replica)
        else:
            ds = ds.map(lambda images, labels, at: (transform.train_batch(images), labels, at),
                        num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(options())

    return input_fn


def eval_examples(dataset, config, indices):
    """(model inputs, labels) of the eval examples at `indices`, in that order, through the eval pipeline (for
    pictures)."""
    batches = [(x.numpy(), y.numpy()) for x, y, _ in eval_input_fn(dataset, config, indices)(
        tf.distribute.InputContext())]
    if not batches:
        return np.zeros([0, *dataset.image_shape], np.float32), np.zeros([0], np.int64)
    return tuple(np.concatenate(parts) for parts in zip(*batches))


def images_at_size(source, prep, indices):
    """Batches (uint8 images [n, h, w, C] at the model's input size, labels [n]) of the examples at `indices` of
    `source`: the stored pixels, resized whole (bilinear, rounded) where stored at another size; what a client of
    an export sends (research/tflite.py). An example that cannot be read or decoded is a UserError naming it."""
    indices = [int(i) for i in indices]
    read = source.reader()

    def at_size(stored, label):
        image = preprocess.decode(source.fetch(stored), prep.channels) if source.encoded else source.fetch(stored)
        if tuple(image.shape[:2]) != tuple(prep.image_size):
            image = tf.cast(tf.round(tf.image.resize(image, prep.image_size)), tf.uint8)
        return tf.ensure_shape(image, [*prep.image_size, prep.channels]), label

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64)).batch(EXPORT_BATCH).map(read)
    ds = ds.unbatch().map(at_size, num_parallel_calls=AUTOTUNE).batch(EXPORT_BATCH).prefetch(AUTOTUNE)
    try:
        for images, labels in ds.with_options(options()):
            yield images.numpy(), labels.numpy()
    except READ_ERRORS:
        bad = next(unreadable(source, prep.channels, indices), None)
        if bad is None:
            raise
        raise UserError(f"cannot read {': '.join(bad)}; {source.advice}") from None


# What reading or decoding a bad example raises inside a pipeline (and so inside the train loop or evaluation).
READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.NotFoundError,
               tf.errors.UnknownError)


def unreadable_example(dataset, config, first_step, num_steps):
    """'NAME: REASON' of the first training example of steps [first_step, first_step + num_steps) that cannot be
    read or decoded, or None: what a READ_ERRORS error inside the train loop was about."""
    per_epoch = steps_per_epoch(dataset, config)

    def indices():
        for step in range(first_step, first_step + num_steps):
            _, _, step_indices = _step_share(tf.constant(step, tf.int64), config, len(dataset.train), per_epoch, 1, 0)
            yield from (int(i) for i in step_indices.numpy())

    found = next(unreadable(dataset.train, dataset.preprocessing.channels, indices()), None)
    return found and ": ".join(found)


def unreadable_eval_example(dataset):
    """'NAME: REASON' of the first eval example that cannot be read or decoded, or None."""
    found = next(unreadable(dataset.eval, dataset.preprocessing.channels, range(len(dataset.eval))), None)
    return found and ": ".join(found)


def unreadable(source, channels, indices):
    """(name, reason) of each example at `indices` of `source` that cannot be read or decoded, lazily."""
    read = source.reader()
    for index in indices:
        reason = _check(read, source, index, channels)
        if reason:
            yield source.name_of(index), reason


def _check(read, source, index, channels):
    """Why example `index` cannot be read or decoded, or None."""
    try:
        image = source.fetch(read(tf.constant([index], tf.int64))[0][0])
        if source.encoded:
            preprocess.decode(image, channels).numpy()
    except READ_ERRORS as e:
        return preprocess.decode_error_line(e)[:200]
    return None


def options():
    options = tf.data.Options()
    options.deterministic = True
    # We shard by hand (above): AUTO sharding by file fails on single-file datasets such as MNIST.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options
