"""The train step library: what a training run and the tools that share its computation (research.benchmark)
build and call. `build` creates the model, optimizer, step and weight average; the step is flat
functions that a test can call alone, as flax's `train_step`: `loss_fn` (the loss of a batch), `forward_backward`
(its gradients), `accumulated` (over micro-batches), `train_step` (one replica's step: mixing, the all-reduce,
clipping, the update) and `run_steps` (steps in a loop on every replica); `make_train_loop` binds them to a run's
model and optimizer in one tf.function (the evaluation pass is research/evaluation.py's). research/trainer.py
strings them into a run.
"""

import contextlib
import functools

import tensorflow as tf
from absl import flags

from research import UserError, cli, config as config_lib, data, mix, models, optim, transfer
from research import distill  # noqa: F401 - its flags are a run's (research/runs.py reads them back through here).
from research.config import CHECKPOINT, declare

SUM = tf.distribute.ReduceOp.SUM

declare(CHECKPOINT, flags.DEFINE_integer(
    "grad_accum_steps", 1,
    "Gradient accumulation: each optimizer step sums the gradients of this many micro-batches of "
    "--batch_size / N examples (global), run one after another inside the step, then clips, checks and "
    "applies once; --batch_size stays the global batch of one optimizer step (data order, schedule and "
    "checkpoints as without). Less memory per step; batch-norm statistics are then each micro-batch's."))


@config_lib.checks
def _check_flags(config):
    config_lib.need(config.grad_accum_steps > 0, f"--grad_accum_steps must be positive, got {config.grad_accum_steps}")
    config_lib.need(config.batch_size % config.grad_accum_steps == 0,
                    f"--batch_size={config.batch_size} does not split into --grad_accum_steps="
                    f"{config.grad_accum_steps} equal micro-batches")


def run_length(config, dataset, strategy):
    """(steps per epoch, total steps): every step is one global batch, the remainder of an epoch is dropped."""
    steps_per_epoch = data.pipeline.steps_per_epoch(dataset, config)
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size={config.batch_size} exceeds the {dataset.num_train} examples of "
                        f"--train_split={config.train_split}")
    if config.batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={config.batch_size} does not split over "
                        f"{strategy.num_replicas_in_sync} replicas")
    if config.batch_size % (strategy.num_replicas_in_sync * config.grad_accum_steps):
        raise UserError(f"--batch_size={config.batch_size} does not split into {strategy.num_replicas_in_sync} "
                        f"replicas x --grad_accum_steps={config.grad_accum_steps} equal micro-batches")
    return steps_per_epoch, config.train_steps or config.train_epochs * steps_per_epoch


def build(config, dataset, strategy, total_steps):
    """(model, optimizer, step, weight average or None), created in the strategy's scope and built, so that every
    variable exists before any restore or tf.function (a deferred restore would create duplicates)."""
    tf.keras.mixed_precision.set_global_policy(config.mixed_precision)  # Global: set for every run.
    # Seeded here, where the initial weights and dropout seeds are drawn, not at the start: whatever ran before
    # (TFDS preparing a dataset in-process draws random numbers) must not shift them, or the first run on a fresh
    # data_dir would differ from every later run, and its resumption from itself.
    tf.keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = models.create(config, dataset)
        try:
            model(tf.zeros([1, *dataset.image_shape]))  # model.build() creates no variables on a subclassed model.
        except ValueError as e:  # E.g. valid convolutions that shrink the image below the next kernel.
            raise UserError(f"--model={config.model} does not fit {dataset.name}'s {dataset.image_shape} images: "
                            f"{cli.keras_error_line(e)}") from None
        transfer.freeze(model, config)
        optimizer = optim.create_optimizer(config, total_steps, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        ema = WeightAverage(model.trainable_variables, config.ema_decay) if config.ema_decay else None
    return model, optimizer, step, ema


def make_train_loop(strategy, model, optimizer, step, config, ema=None, teacher=None):
    """`train_loop(iterator, num_steps)` runs `num_steps` train steps (`train_step` on every replica) inside one
    tf.function call; with a `teacher` (research/distill.py) each (micro-)batch's loss mixes in distillation.

    Returns the sums over the steps run of [mean loss, correct, examples, gradient norm], the number of steps run,
    and whether all were finite: at the first non-finite loss or gradient it stops (that step's update is applied,
    and the caller never saves such a state: it stops or restores the last checkpoint). Under mixed_float16 a
    non-finite gradient is instead the loss scaler's business (it skips the update and lowers the scale).
    The optimizer is switched to apply the gradients it is given as they are (optim.apply_summed_gradients).
    """
    optim.apply_summed_gradients(optimizer)
    _check_sync_batchnorm_under_xla(strategy, config)
    replica_step = functools.partial(train_step, make_gradients(model, optimizer, config, teacher), model, optimizer,
                                     step, config)

    @tf.function
    def train_loop(iterator, num_steps):
        return run_steps(strategy, replica_step, step, ema, iterator, num_steps)

    return train_loop


def _check_sync_batchnorm_under_xla(strategy, config):
    if (config.jit_compile and config.sync_batchnorm and models.has(config, "batch_norm")
            and isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync > 1
            and not all("GPU" in device.upper() for device in strategy.extended.worker_devices)):
        # MirroredStrategy synchronises non-GPU replicas by merge calls, which an XLA-compiled function cannot hold.
        raise UserError("--sync_batchnorm with --jit_compile needs GPU replicas under --strategy=mirrored; "
                        "drop one of the two")


def loss_fn(model, images, targets, config, teacher=None, teacher_logits=None):
    """(logits, the loss of one (micro-)batch as a share of the global batch's mean): what the step minimises; with
    a `teacher`, each example's label loss mixed with distillation from `teacher_logits` (research/distill.py)."""
    logits = model(images, training=True)
    losses = optim.per_example_loss(targets, logits, config.label_smoothing)
    if teacher is not None:
        losses = teacher.mixed_loss(teacher_logits, logits, losses)
    return logits, tf.nn.compute_average_loss(losses, global_batch_size=config.batch_size)


def forward_backward(model, optimizer, config, teacher, images, targets, labels):
    """(loss as a share of the global batch's mean, correct predictions, gradients) of one (micro-)batch."""
    teacher_logits = None if teacher is None else teacher.logits(images)  # Outside the tape: no gradient.
    with tf.GradientTape() as tape:
        logits, loss = loss_fn(model, images, targets, config, teacher, teacher_logits)
        scaled_loss = optimizer.scale_loss(loss) if _loss_scaling(optimizer) else loss
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
    return loss, correct, tape.gradient(scaled_loss, model.trainable_variables)


def make_gradients(model, optimizer, config, teacher=None):
    """`forward_backward` of this model (and teacher) as a function of (images, targets, labels), XLA-compiled
    with --jit_compile."""
    gradients = functools.partial(forward_backward, model, optimizer, config, teacher)
    return tf.function(gradients, jit_compile=True) if config.jit_compile else gradients


def accumulated(gradients, config, images, targets, labels):
    """`gradients`' results summed over --grad_accum_steps equal slices of the batch, run one after another: each
    slice waits for the previous one's gradients (a control dependency), so that only one slice's activations are
    alive at a time, which is what saves the memory. Unrolled, not a tf.while_loop: a batch-norm all-reduce
    (--sync_batchnorm) cannot run inside control flow under MirroredStrategy."""
    if config.grad_accum_steps == 1:
        return gradients(images, targets, labels)
    total = None
    for micro_batch in zip(*(tf.split(t, config.grad_accum_steps) for t in (images, targets, labels))):
        if total is not None:
            with tf.control_dependencies(total[2]):
                micro_batch = [tf.identity(t) for t in micro_batch]
        results = gradients(*micro_batch)
        total = results if total is None else (
            total[0] + results[0], total[1] + results[1], [a + b for a, b in zip(total[2], results[2])])
    return total


def train_step(gradients, model, optimizer, step, config, images, labels):
    """One replica's share of one train step (in a replica context: `strategy.run`); returns [loss, correct,
    examples, gradient norm / replicas], to be summed over the replicas.

    With --mixup_alpha or --cutmix_alpha the replica mixes its batch, seeded by (seed, step, replica), and trains
    on the soft targets; accuracy is still counted against the unmixed labels. With --grad_accum_steps=K the batch
    (mixed first, so the mixing is the same for any K) is cut into K micro-batches whose gradients are summed before
    the one all-reduce and update. `gradients`: make_gradients(model, optimizer, config)."""
    replica = tf.distribute.get_replica_context()
    targets = labels
    if config.mixup_alpha or config.cutmix_alpha:
        seed = mix.batch_seed(config.seed, step, replica.replica_id_in_sync_group)
        images, targets = mix.mix(images, labels, model.num_classes, config.mixup_alpha, config.cutmix_alpha, seed)
    loss, correct, grads = accumulated(gradients, config, images, targets, labels)
    # The step's one all-reduce: the gradient summed over replicas here, so that its norm (for clipping and the
    # NaN check) is the global batch's, identical on every replica; for the same reason the loss scaler's
    # finiteness check, which looks at one replica only, sees every replica's overflow. The optimizer applies
    # the sum as it is (apply_summed_gradients), without all-reducing it again.
    grads = replica.all_reduce(SUM, grads)
    loss_scaling = _loss_scaling(optimizer)
    scale = optimizer.dynamic_scale if loss_scaling else 1.0
    norm = tf.linalg.global_norm(grads) / scale
    if config.clip_grad_norm:
        grads, _ = tf.clip_by_global_norm(grads, config.clip_grad_norm * scale, use_norm=norm * scale)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    examples = tf.cast(tf.shape(labels)[0], tf.float32)
    if loss_scaling:
        norm = tf.where(tf.math.is_finite(norm), norm, 0.0)  # An overflow step is skipped, not an error.
    return tf.stack([loss, correct, examples, norm / replica.num_replicas_in_sync])


def run_steps(strategy, replica_step, step, ema, iterator, num_steps):
    """`num_steps` steps of `replica_step(images, labels)` on every replica (in a tf.function): the step counter
    and weight average advanced after each; stops after the first non-finite one. See make_train_loop."""
    totals = tf.zeros([4])
    steps_run = tf.constant(0)
    finite = tf.constant(True)
    for _ in tf.range(num_steps):
        stats = strategy.reduce(SUM, strategy.run(replica_step, args=next(iterator)), axis=None)
        step.assign_add(1)
        if ema is not None:
            ema.update(step)
        totals += stats
        steps_run += 1
        finite = tf.reduce_all(tf.math.is_finite(stats))
        if not finite:
            break
    return totals, steps_run, finite


def _loss_scaling(optimizer):
    return isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)


class WeightAverage:
    """Exponential moving average of the trainable weights (`--ema_decay`), updated after every step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so that early averages are not dominated by the random
    initialisation. Its variables go into the checkpoint as `ema`, parallel to `model.trainable_variables`.
    """

    def __init__(self, variables, decay):
        self.variables = variables
        self.decay = decay
        self.average = [tf.Variable(v, trainable=False, name="ema") for v in variables]

    def restart(self):
        """The average starts again from the weights as they are now (loaded by --init_checkpoint)."""
        for average, v in zip(self.average, self.variables):
            average.assign(v)

    def update(self, step):
        t = tf.cast(step, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
        for average, v in zip(self.average, self.variables):
            average.assign(decay * average + (1.0 - decay) * v)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the model holds the averaged weights (for evaluation)."""
        current = [v.numpy() for v in self.variables]
        for average, v in zip(self.average, self.variables):
            v.assign(average)
        try:
            yield
        finally:
            for value, v in zip(current, self.variables):
                v.assign(value)
