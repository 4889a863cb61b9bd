"""A training run from start to end: `train_and_evaluate(config)`, resuming from the run directory's latest
checkpoint.

Read `train_and_evaluate` top to bottom for the whole run, then its sections below it: `_train` (the loops of steps,
evaluations and saves), `_loop_of_steps`, `_restore_after_nonfinite`, `_evaluate` and `_finish` (the results);
research/train_lib.py has the train step, the evaluation and the model building they call; research/train.py is the
program (`python -m research.train`).
"""

import contextlib
import dataclasses
import signal
import threading
import time

import tensorflow as tf
from absl import logging

from research import (UserError, checkpoint, config as config_lib, data, distribute, plots, provenance, reporting,
                      run_dir, train_lib, transfer)


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved; exit non-zero so schedulers requeue the job."""

    def __init__(self, signum, step):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, checkpoint saved; "
                         "rerun the same command to resume")
        self.exit_code = 128 + signum


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
        steps_per_epoch, total_steps = train_lib.run_length(config, dataset, strategy)
        eval_every = config.eval_every or steps_per_epoch
        model, optimizer, step, ema = train_lib.build(config, dataset, strategy, total_steps)
        ckpt = tf.train.Checkpoint(step=step, model_variables=checkpoint.model_state(model), optimizer=optimizer,
                                   ema=ema.average if ema else [])
        checkpoints = checkpoint.Checkpoints(ckpt, config.model_dir, config.keep_checkpoints, chief,
                                             distribute.worker_id(strategy))
        flag_changes = {}
        if checkpoints.candidates():
            flag_changes = checkpoint.check_resume_config(config.model_dir, config)
            restored = checkpoints.restore_latest(config.model)  # (An error line if none is readable.)
            print(f"Resuming from {restored} at step {int(step.numpy())}" + "".join(
                f"; --{name}: {old} -> {new}" for name, (old, new) in sorted(flag_changes.items())) + (
                f"; --init_checkpoint={config.init_checkpoint} is not used (a resume starts from its own weights)"
                if config.init_checkpoint else ""))
        elif config.init_checkpoint:
            print(transfer.init_weights(model, config, dataset.image_shape))
        finished = run_dir.read_results(config.model_dir)
        if int(step.numpy()) >= total_steps and finished:
            print(f"Run in {config.model_dir} already finished at step {int(step.numpy())}; results in "
                  f"{run_dir.join(config.model_dir, run_dir.RESULTS_FILE)}")
            return finished
        if chief:
            run_dir.read_metrics(config.model_dir)  # Every run file this run will read back, read before any write:
            run_dir.read_best(config.model_dir)  # a damaged one refuses the run with nothing changed.
            provenance.record(config.model_dir, int(step.numpy()))
            if flag_changes:
                run_dir.record_flag_changes(config.model_dir, int(step.numpy()), flag_changes)
            run_dir.write_flags(config.model_dir, config)
            run_dir.write_dataset_info(config.model_dir, dataset.metadata().to_json())
            if dataset.file_lists:  # Written here only: a refused resume or any reader leaves them as they were.
                run_dir.write_data_files(config.model_dir, dataset.file_lists)
            model.summary(expand_nested=True)

        config_lib.warn_ignored(config)  # Here, once the run is sure to train: never in front of an error line.

        # -------------------------------------------------------------- Train: loops of steps, evals, saves
        run = _Run(
            config, dataset, strategy, model, optimizer, step, ema, checkpoints, started, total_steps, steps_per_epoch,
            eval_every, train_loop=train_lib.make_train_loop(strategy, model, optimizer, step, config, ema),
            evaluate=train_lib.make_evaluate(strategy, model, dataset.num_classes),
            iterator=iter(strategy.distribute_datasets_from_function(
                data.train_input_fn(dataset, config, int(step.numpy())))),
            eval_data=strategy.distribute_datasets_from_function(data.eval_input_fn(dataset, config)),
            reporter=reporting.Reporter(config, dataset, model, total_steps, steps_per_epoch, int(step.numpy()),
                                        chief),
            stop_signal=stack.enter_context(_catch_stop_signals()))  # Before this, a signal just ends the process.
        current, train_metrics, last_eval = _train(run)
        return _finish(run, current, train_metrics, last_eval, chief)


@dataclasses.dataclass
class _Run:
    """What the training loop of one run works with, built by train_and_evaluate."""
    config: object
    dataset: object
    strategy: object
    model: object
    optimizer: object
    step: object
    ema: object
    checkpoints: object
    started: float  # time.time() at the start: wall times count data loading and tracing.
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    train_loop: object  # train_lib.make_train_loop's.
    evaluate: object  # train_lib.make_evaluate's.
    iterator: object  # Of the distributed training stream, from the step the run starts at.
    eval_data: object
    reporter: object
    stop_signal: list  # The signals received (_catch_stop_signals).


def _train(run):
    """Loops of steps up to the last step, each ending at an event (epoch end, evaluation, checkpoint, the end);
    returns (the last step, the last loop's train metrics, the last (eval metrics, confusion) or None)."""
    config = run.config
    restores, loops_run, train_metrics, last_eval = 0, 0, {}, None
    current = int(run.step.numpy())
    while current < run.total_steps:
        num_steps = min([config.steps_per_loop, run.total_steps - current] + [
            every - current % every for every in (run.steps_per_epoch, run.eval_every, config.checkpoint_every)])
        loop_start = time.time()
        totals, steps_run, finite = _loop_of_steps(run, current, num_steps, loops_run)
        loops_run += 1
        (loss, correct, examples, norm), steps_run, current = totals.numpy(), int(steps_run), int(run.step.numpy())
        if not finite:
            restores += 1
            _restore_after_nonfinite(run, current, restores)
            continue
        train_metrics = {"loss": loss / steps_run, "accuracy": correct / examples, "grad_norm": norm / steps_run,
                         "learning_rate": tf.convert_to_tensor(run.optimizer.learning_rate),
                         "images_per_sec": examples / (time.time() - loop_start)}
        train_metrics = {k: float(v) for k, v in train_metrics.items()}
        run.reporter.train(current, train_metrics)
        if current % run.eval_every == 0 or current == run.total_steps:
            last_eval = _evaluate(run, current, train_metrics)
            run.checkpoints.save_best(current, last_eval[0]["accuracy"])
        saved = current % config.checkpoint_every == 0 or current == run.total_steps
        if saved:
            run.checkpoints.save(current)
        # A signal may reach only some workers, or reach them in different loops: all stop when any got one,
        # so that they save the same step (a collective on every process; cheap on one).
        if distribute.any_worker(run.strategy, run.stop_signal):
            if not saved:
                run.checkpoints.save(current)
            raise Preempted(run.stop_signal[0] if run.stop_signal else signal.SIGTERM, current)
    return current, train_metrics, last_eval


def _loop_of_steps(run, current, num_steps, loops_run):
    """One call of the train loop: `num_steps` steps from step `current`; an unreadable training example is one
    error line naming it (the last checkpoint left intact)."""
    with _profiling(run.config, current, num_steps, run.total_steps, loops_run):
        try:
            return run.train_loop(run.iterator, tf.constant(num_steps))
        except data.READ_ERRORS:
            bad = data.unreadable_example(run.dataset, run.config, current, num_steps)
            if bad is None:
                raise
            raise UserError(f"cannot read training example {bad} (a step in {current + 1}-"
                            f"{current + num_steps}); last checkpoint {run.checkpoints.latest() or 'none'} "
                            f"left intact; {run.dataset.train.advice}") from None


def _restore_after_nonfinite(run, current, restores):
    """A non-finite loss or gradient at step `current`: an error line, or with --on_nonfinite=restore the last
    checkpoint restored (the `restores`-th time) and the run going on at this step with the next batch."""
    config, last_good = run.config, run.checkpoints.latest()
    if config.on_nonfinite != "restore" or restores > config.max_nonfinite_restores or not last_good:
        raise UserError(f"non-finite loss or gradient at step {current}; last good checkpoint: "
                        f"{last_good or 'none'} (left intact)")
    logging.warning("non-finite loss or gradient at step %d: restoring %s (%d/%d) and going on "
                    "with the next batch", current, last_good, restores, config.max_nonfinite_restores)
    run.checkpoints.restore(last_good)
    run.step.assign(current)
    run.optimizer.iterations.assign(current)  # The learning-rate schedule counts these: it is step `current`'s.


def _evaluate(run, current, train_metrics):
    """(eval metrics, confusion matrix) of the model at step `current` (its weight average with --ema_decay),
    reported; an unreadable eval example saves the training done and is one error line naming it."""
    with run.ema.swapped_in() if run.ema else contextlib.nullcontext():  # The reporter's pictures see them too.
        try:
            loss, confusion, top_k = (t.numpy() for t in run.evaluate(run.eval_data))
        except data.READ_ERRORS:
            bad = data.unreadable_eval_example(run.dataset)
            if bad is None:
                raise
            saved_at = run.checkpoints.save(current)  # The training done so far is not lost with the eval.
            raise UserError(f"cannot read eval example {bad} (evaluating step {current}); training saved "
                            f"as {saved_at}; {run.dataset.eval.advice}") from None
        metrics = train_lib.summarize_eval(loss, confusion, top_k)
        run.reporter.eval(current, {**metrics, "elapsed_s": round(time.time() - run.started, 1),
                                    **{f"train_{k}": v for k, v in train_metrics.items()}}, confusion)
    return metrics, confusion


def _finish(run, current, train_metrics, last_eval, chief):
    """The results (written to results.json by the chief, with the curves), evaluating the last step if no loop
    did."""
    config = run.config
    eval_metrics, confusion = last_eval or _evaluate(run, current, train_metrics)
    results = {"step": current, "eval": eval_metrics, "train": train_metrics,
               "wall_time_s": round(time.time() - run.started, 1), "params": int(run.model.count_params()),
               "dataset": config.dataset, "model": config.model, "confusion_matrix": confusion.astype(int).tolist()}
    if chief:
        run_dir.write_results(config.model_dir, results)
        plots.write_curves(config.model_dir)
    run.reporter.flush()
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
