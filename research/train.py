"""Train and evaluate an image classifier: `python -m research.train --flagfile=configs/cnn.cfg --model_dir=runs/x`.

Read `train_and_evaluate` top to bottom for the whole run, and `make_train_loop` for one train step. Running the
same command again resumes from the run directory's latest checkpoint; a finished run says so and exits 0.
"""

import contextlib
import re
import signal
import sys
import threading
import time

from research import cli, config as config_lib  # Standard library and absl only: they run before TensorFlow loads.

if __name__ == "__main__":
    cli.start()
    cli.parse_flags(sys.argv, __doc__, known_only=True)  # The flags known so far: bad values fail at once.

import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

from research import (UserError, checkpoint, data, distribute, mix, models, optim, plots, provenance,  # noqa: E402
                      reporting, run_dir)

SUM = tf.distribute.ReduceOp.SUM


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved; exit non-zero so schedulers requeue the job."""

    def __init__(self, signum, step):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, checkpoint saved; "
                         "rerun the same command to resume")
        self.exit_code = 128 + signum


def make_train_loop(strategy, model, optimizer, step, config, ema=None):
    """`train_loop(iterator, num_steps)` runs `num_steps` train steps inside one tf.function call.

    Returns the sums over the steps run of [mean loss, correct, examples, gradient norm], the number of steps run,
    and whether all were finite: at the first non-finite loss or gradient it stops (that step's update is applied,
    and the caller never saves such a state: it stops or restores the last checkpoint). Under mixed_float16 a
    non-finite gradient is instead the loss scaler's business (it skips the update and lowers the scale).
    With --mixup_alpha or --cutmix_alpha each replica mixes its batch, seeded by (seed, step, replica), and trains
    on the soft targets; accuracy is still counted against the unmixed labels.
    """
    variables = model.trainable_variables
    num_replicas = strategy.num_replicas_in_sync
    loss_scaling = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    mixing = config.mixup_alpha or config.cutmix_alpha

    def forward_backward(images, targets):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            losses = optim.per_example_loss(targets, logits, config.label_smoothing)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=config.batch_size)
            scaled_loss = optimizer.scale_loss(loss) if loss_scaling else loss
        return loss, logits, tape.gradient(scaled_loss, variables)

    if config.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        targets = labels
        if mixing:
            seed = mix.batch_seed(config.seed, step, tf.distribute.get_replica_context().replica_id_in_sync_group)
            images, targets = mix.mix(images, labels, model.num_classes, config.mixup_alpha, config.cutmix_alpha, seed)
        loss, logits, grads = forward_backward(images, targets)
        # Sum the gradient over replicas here, so that its norm (for clipping and the NaN check) is the global
        # batch's, identical on every replica; for the same reason the loss scaler's finiteness check, which looks
        # at one replica only, sees every replica's overflow. Keras' apply_gradients sums over replicas again and
        # has no switch to skip that, so it gets 1/n of the sum: n identical copies add up to the sum (exactly,
        # for n = 2^k).
        grads = tf.distribute.get_replica_context().all_reduce(SUM, grads)
        scale = optimizer.dynamic_scale if loss_scaling else 1.0
        norm = tf.linalg.global_norm(grads) / scale
        if config.clip_grad_norm:
            grads, _ = tf.clip_by_global_norm(grads, config.clip_grad_norm * scale, use_norm=norm * scale)
        optimizer.apply_gradients(zip([g / num_replicas for g in grads], variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
        examples = tf.cast(tf.shape(labels)[0], tf.float32)
        if loss_scaling:
            norm = tf.where(tf.math.is_finite(norm), norm, 0.0)  # An overflow step is skipped, not an error.
        return tf.stack([loss, correct, examples, norm / num_replicas])  # Summed over replicas by the caller.

    @tf.function
    def train_loop(iterator, num_steps):
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

    return train_loop


class WeightAverage:
    """Exponential moving average of the trainable weights (`--ema_decay`), updated after every step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so that early averages are not dominated by the random
    initialisation. Its variables go into the checkpoint as `ema`, parallel to `model.trainable_variables`.
    """

    def __init__(self, variables, decay):
        self.variables = variables
        self.decay = decay
        self.average = [tf.Variable(v, trainable=False, name="ema") for v in variables]

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


TOP_K = 5  # Top-5 accuracy is reported for datasets of more classes than this.


def make_evaluate(strategy, model, num_classes):
    """`evaluate(distributed_dataset)` -> (summed cross-entropy, confusion matrix, examples whose label is among
    the TOP_K highest logits) over every example once."""

    def replica_eval(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        loss = tf.reduce_sum(optim.per_example_loss(labels, logits))
        confusion = tf.math.confusion_matrix(labels, tf.argmax(logits, -1), num_classes, dtype=tf.float32)
        in_top_k = tf.math.in_top_k(labels, logits, k=min(TOP_K, num_classes))
        return loss, confusion, tf.reduce_sum(tf.cast(in_top_k, tf.float32))

    @tf.function
    def evaluate(dist_dataset):
        loss, confusion, top_k = tf.constant(0.0), tf.zeros([num_classes, num_classes]), tf.constant(0.0)
        for images, labels in dist_dataset:
            replica_loss, replica_confusion, replica_top_k = strategy.run(replica_eval, args=(images, labels))
            loss += strategy.reduce(SUM, replica_loss, axis=None)
            confusion += strategy.reduce(SUM, replica_confusion, axis=None)
            top_k += strategy.reduce(SUM, replica_top_k, axis=None)
        return loss, confusion, top_k

    return evaluate


def summarize_eval(loss, confusion, top_k):
    """The numbers of one evaluation: mean loss, accuracy, examples, and top-5 accuracy if there are > 5 classes."""
    examples = int(confusion.sum())
    metrics = {"loss": float(loss / examples), "accuracy": float(confusion.trace() / examples),
               "examples": examples}
    if len(confusion) > TOP_K:
        metrics["top5_accuracy"] = float(top_k / examples)
    return metrics


def run_length(config, dataset, strategy):
    """(steps per epoch, total steps): every step is one global batch, the remainder of an epoch is dropped."""
    steps_per_epoch = dataset.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size={config.batch_size} exceeds the {dataset.num_train} examples of "
                        f"--train_split={config.train_split}")
    if config.batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={config.batch_size} does not split over "
                        f"{strategy.num_replicas_in_sync} replicas")
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
            reason = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()  # (Keras colours it.)
                      if line.strip() and not line.startswith("Exception encountered")]
            raise UserError(f"--model={config.model} does not fit {dataset.name}'s {dataset.image_shape} images: "
                            f"{(reason or [str(e)])[0]}") from None
        optimizer = optim.create_optimizer(config, total_steps, model)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        ema = WeightAverage(model.trainable_variables, config.ema_decay) if config.ema_decay else None
    return model, optimizer, step, ema


def train_and_evaluate(config):
    """Trains `config.model` on `config.dataset` in `config.model_dir`, resuming if it holds a checkpoint.

    Returns the results dict also written to `model_dir/results.json`.
    """
    # ------------------------------------------------------------------ Setup: seeds, strategy, run directory
    started = time.time()  # Wall times (metrics.jsonl elapsed_s, results.json) count data loading and tracing.
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.create_strategy(config)
    chief = distribute.is_chief(strategy)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_dir.created(config.model_dir, remove_on_failure=chief))
        if chief:
            stack.enter_context(run_dir.Lock(config.model_dir))

        # -------------------------------------------------------------- Data, model, optimizer, checkpoint
        dataset = data.load(config)
        print(f"Data: {dataset.name}, {dataset.num_train} training and {len(dataset.eval)} eval examples, "
              f"{dataset.reading}; model input {dataset.image_shape}")
        steps_per_epoch, total_steps = run_length(config, dataset, strategy)
        eval_every = config.eval_every or steps_per_epoch
        model, optimizer, step, ema = build(config, dataset, strategy, total_steps)
        ckpt = tf.train.Checkpoint(step=step, model_variables=checkpoint.model_state(model), optimizer=optimizer,
                                   ema=ema.average if ema else [])
        checkpoints = checkpoint.Checkpoints(ckpt, config.model_dir, config.keep_checkpoints, chief,
                                             distribute.worker_id(strategy))
        if checkpoints.candidates():
            checkpoint.check_resume_config(config.model_dir, config)
            restored = checkpoints.restore_latest(config.model)
            if restored is None:
                raise UserError(f"{config.model_dir} has checkpoints but none is readable; nothing was changed")
            print(f"Resuming from {restored} at step {int(step.numpy())}")
        elif config.init_checkpoint:
            path = checkpoint.restore_init_weights(model, config.init_checkpoint, config.init_from_average)
            print(f"Initialised weights from {path}{' (its moving average)' if config.init_from_average else ''}")
        finished = run_dir.read_results(config.model_dir)
        if int(step.numpy()) >= total_steps and finished:
            print(f"Run in {config.model_dir} already finished at step {int(step.numpy())}; results in "
                  f"{run_dir.join(config.model_dir, run_dir.RESULTS_FILE)}")
            return finished
        if chief:
            run_dir.write_flags(config.model_dir, config)
            provenance.record(config.model_dir, int(step.numpy()))  # Versions, code, machine: one line per start.
            run_dir.write_dataset_info(config.model_dir, dataset.metadata())
            model.summary(expand_nested=True)

        # -------------------------------------------------------------- Train: loops of steps, evals, saves
        train_loop = make_train_loop(strategy, model, optimizer, step, config, ema)
        evaluate = make_evaluate(strategy, model, dataset.num_classes)
        iterator = iter(strategy.distribute_datasets_from_function(
            data.train_input_fn(dataset, config, int(step.numpy()))))
        eval_data = strategy.distribute_datasets_from_function(data.eval_input_fn(dataset, config))
        reporter = reporting.Reporter(config, dataset, model, total_steps, steps_per_epoch, int(step.numpy()), chief)
        stop_signal = stack.enter_context(_catch_stop_signals())  # Before this, a signal just ends the process.
        restores, loops_run, train_metrics, last_eval = 0, 0, {}, None

        def run_eval(current):
            with ema.swapped_in() if ema else contextlib.nullcontext():  # The reporter's pictures see them too.
                try:
                    loss, confusion, top_k = (t.numpy() for t in evaluate(eval_data))
                except data.READ_ERRORS:
                    bad = data.unreadable_eval_example(dataset)
                    if bad is None:
                        raise
                    saved_at = checkpoints.save(current)  # The training done so far is not lost with the eval.
                    raise UserError(f"cannot read eval example {bad} (evaluating step {current}); training saved "
                                    f"as {saved_at}; {dataset.eval.advice}") from None
                metrics = summarize_eval(loss, confusion, top_k)
                reporter.eval(current, {**metrics, "elapsed_s": round(time.time() - started, 1),
                                        **{f"train_{k}": v for k, v in train_metrics.items()}}, confusion)
            return metrics, confusion

        current = int(step.numpy())
        while current < total_steps:
            # A loop of steps ends at every event boundary: epoch (progress), evaluation, checkpoint, the end.
            num_steps = min([config.steps_per_loop, total_steps - current] + [
                every - current % every for every in (steps_per_epoch, eval_every, config.checkpoint_every)])
            loop_start = time.time()
            with _profiling(config, current, num_steps, total_steps, loops_run):
                try:
                    totals, steps_run, finite = train_loop(iterator, tf.constant(num_steps))
                except data.READ_ERRORS:
                    bad = data.unreadable_example(dataset, config, current, num_steps)
                    if bad is None:
                        raise
                    raise UserError(f"cannot read training example {bad} (a step in {current + 1}-"
                                    f"{current + num_steps}); last checkpoint {checkpoints.latest() or 'none'} "
                                    f"left intact; {dataset.train.advice}") from None
            loops_run += 1
            (loss, correct, examples, norm), steps_run, current = totals.numpy(), int(steps_run), int(step.numpy())
            if not finite:
                last_good = checkpoints.latest()
                if config.on_nonfinite != "restore" or restores >= config.max_nonfinite_restores or not last_good:
                    raise UserError(f"non-finite loss or gradient at step {current}; last good checkpoint: "
                                    f"{last_good or 'none'} (left intact)")
                restores += 1
                logging.warning("non-finite loss or gradient at step %d: restoring %s (%d/%d) and going on "
                                "with the next batch", current, last_good, restores, config.max_nonfinite_restores)
                checkpoints.restore(last_good)
                step.assign(current)
                optimizer.iterations.assign(current)  # The learning-rate schedule counts these: it is step `current`'s.
                continue
            train_metrics = {"loss": loss / steps_run, "accuracy": correct / examples, "grad_norm": norm / steps_run,
                             "learning_rate": tf.convert_to_tensor(optimizer.learning_rate),
                             "images_per_sec": examples / (time.time() - loop_start)}
            train_metrics = {k: float(v) for k, v in train_metrics.items()}
            reporter.train(current, train_metrics)
            if current % eval_every == 0 or current == total_steps:
                last_eval = run_eval(current)
                checkpoints.save_best(current, last_eval[0]["accuracy"])
            saved = current % config.checkpoint_every == 0 or current == total_steps
            if saved:
                checkpoints.save(current)
            # A signal may reach only some workers, or reach them in different loops: all stop when any got one,
            # so that they save the same step (a collective on every process; cheap on one).
            if distribute.any_worker(strategy, stop_signal):
                if not saved:
                    checkpoints.save(current)
                raise Preempted(stop_signal[0] if stop_signal else signal.SIGTERM, current)

        # -------------------------------------------------------------- Results
        eval_metrics, confusion = last_eval or run_eval(current)
        results = {"step": current, "eval": eval_metrics, "train": train_metrics,
                   "wall_time_s": round(time.time() - started, 1), "params": int(model.count_params()),
                   "dataset": config.dataset, "model": config.model, "confusion_matrix": confusion.astype(int).tolist()}
        if chief:
            run_dir.write_results(config.model_dir, results)
            plots.write_curves(config.model_dir)
        reporter.finish(results)
        print(f"Done: step {current}, eval accuracy {eval_metrics['accuracy']:.4f}, loss {eval_metrics['loss']:.4f} "
              f"({results['wall_time_s']} s)")
        return results


def _profiling(config, current, num_steps, total_steps, loops_run):
    """A TensorBoard profile (model_dir/train, Profile tab) of this loop if --profile_steps asks for it: a step
    number inside it, 'first' for the first loop after the one that traced, 'last' for the final loop."""
    wanted = any(s.isdigit() and current < int(s) <= current + num_steps for s in config.profile_steps) or (
        "first" in config.profile_steps and loops_run == 1) or (
        "last" in config.profile_steps and current + num_steps == total_steps)
    if not wanted:
        return contextlib.nullcontext()
    return tf.profiler.experimental.Profile(run_dir.join(config.model_dir, "train"))


@contextlib.contextmanager
def _catch_stop_signals():
    """Turns SIGTERM/SIGINT into a request, honoured after the current loop of steps (a list holding the signal)."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv):
    """`python -m research.train FLAGS`: a mistake is one error line and exit status 2; a run stopped by a signal
    exits 128 + its number, after saving."""
    cli.parse_flags(argv, __doc__)
    return cli.run(_train_from_flags)


def _train_from_flags(_):
    try:
        train_and_evaluate(config_lib.config_from_flags())
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except tf.errors.UnavailableError as e:
        message = distribute.lost_worker_message(e)  # Multi-worker: another worker died or stopped answering.
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
