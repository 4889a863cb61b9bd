"""A training run from start to end: `train_and_evaluate(config)`, resuming from the run directory's latest
checkpoint.

Read `train_and_evaluate` top to bottom for the whole run, then its sections below it: `_train` (the loops of steps,
evaluations and saves), `_loop_of_steps`, `_restore_after_nonfinite`, `_evaluate` and `_finish` (the results);
research/train_lib.py has the train step and the model building they call, research/evaluation.py the evaluation of
every eval set; research/train.py is the program (`python -m research.train`).
"""

import contextlib
import dataclasses
import json
import signal
import threading
import time

import tensorflow as tf
from absl import logging

from research import (UserError, checkpoint, config as config_lib, data, distribute, evaluation, fs, lock, metrics,
                      provenance, reporting, run_dir, teacher as teacher_lib, train_lib, transfer)


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
    if config.init_checkpoint:  # A path TensorFlow cannot open is one line before any work, as --model_dir's is.
        fs.check_filesystem(config.init_checkpoint, "--init_checkpoint")
    strategy = distribute.create_strategy(config)
    chief = distribute.is_chief(strategy)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_dir.created(config.model_dir, remove_on_failure=chief))
        if chief:
            stack.enter_context(lock.Lock(config.model_dir))

        # -------------------------------------------------------------- Data, model, optimizer, checkpoint
        dataset = data.load(config)
        print(f"Data: {dataset.name}, {dataset.num_train} training and {len(dataset.eval)} eval examples"
              + "".join(f", {len(source)} in {split}" for split, source in dataset.extra_eval)
              + f", {dataset.reading}; model input {dataset.image_shape}")
        steps_per_epoch, total_steps = train_lib.run_length(config, dataset, strategy)
        eval_every = {config_lib.EPOCH: steps_per_epoch, config_lib.NEVER: None}.get(config.eval_every,
                                                                                     config.eval_every)
        model, optimizer, step, ema = train_lib.build(config, dataset, strategy, total_steps)
        teacher = teacher_lib.load(config, dataset, strategy) if config.teacher else None  # Sets --teacher_sha256.
        ckpt = tf.train.Checkpoint(step=step, model_variables=checkpoint.model_state(model), optimizer=optimizer,
                                   ema=ema.average if ema else [])
        checkpoints = checkpoint.Checkpoints(ckpt, config.model_dir, config.keep_checkpoints, chief,
                                             distribute.worker_id(strategy))
        resuming, unused_init = bool(checkpoints.candidates()), None
        inputs = {"teacher": {"path": config.teacher, "sha256": config.teacher_sha256}} if teacher else {}
        if resuming and config.init_checkpoint:
            unused_init, config = config.init_checkpoint, _with_recorded_init(config)
        flag_changes = {}
        if resuming or run_dir.has_records(config.model_dir):  # Any earlier attempt: its settings must be these.
            flag_changes = checkpoint.check_resume_config(config.model_dir, config, _without_effect(config, dataset))
        if resuming:
            restored = checkpoints.restore_latest(config.model)  # (An error line if none is readable.)
            print(f"Resuming from {restored} at step {int(step.numpy())}" + "".join(
                f"; --{name}: {old} -> {new}" for name, (old, new) in sorted(flag_changes.items())) + (
                f"; --init_checkpoint={unused_init} is not used (a resume starts from its own weights)"
                if unused_init else ""))
        elif config.init_checkpoint or config.pretrained:  # A fresh start from other weights.
            if config.init_checkpoint:
                loaded = transfer.init_weights(model, config, dataset)
            else:
                loaded, inputs["pretrained"] = transfer.load_pretrained(model, config)
            print(loaded)
            if ema:
                ema.restart()  # The average of a fine-tune starts from the loaded weights, not the random ones.
        finished = run_dir.read_results(config.model_dir)
        if int(step.numpy()) >= total_steps and finished:
            print(f"Run in {config.model_dir} already finished at step {int(step.numpy())}; results in "
                  f"{fs.join(config.model_dir, run_dir.RESULTS_FILE)}")
            return finished
        if chief:
            run_dir.read_metrics(config.model_dir)  # Every run file this run will read back, read before any write:
            run_dir.read_best(config.model_dir)  # a damaged one refuses the run with nothing changed.
            removed = run_dir.rewind(config.model_dir, int(step.numpy()), restart=not resuming)
            if removed:
                print(f"Removed the records of steps after {int(step.numpy())}, of an earlier attempt that died "
                      f"before its next checkpoint: {', '.join(removed)}")
            provenance.record(config.model_dir, int(step.numpy()), **inputs)
            if flag_changes:
                run_dir.record_flag_changes(config.model_dir, int(step.numpy()), flag_changes)
            run_dir.write_flags(config.model_dir, config)
            run_dir.write_dataset_info(config.model_dir, dataset.metadata().to_json())
            if dataset.file_lists:  # Written here only: a refused resume or any reader leaves them as they were.
                run_dir.write_data_files(config.model_dir, dataset.file_lists)
            model.summary(expand_nested=True)

        config_lib.warn_ignored(config)  # Here, once the run is sure to train: never in front of an error line.

        # -------------------------------------------------------------- Train: loops of steps, evals, saves
        evaluator = evaluation.Evaluator(strategy, model, dataset, config) if eval_every else None
        run = _Run(
            config, dataset, strategy, model, optimizer, step, ema, checkpoints, started, total_steps, steps_per_epoch,
            eval_every, train_loop=train_lib.make_train_loop(strategy, model, optimizer, step, config, ema, teacher),
            evaluator=evaluator,
            agreement=teacher.make_agreement(strategy, model) if teacher else lambda eval_data: {},
            iterator=iter(strategy.distribute_datasets_from_function(
                data.train_input_fn(dataset, config, int(step.numpy())))),
            reporter=reporting.Reporter(config, dataset, model, evaluator, total_steps, steps_per_epoch,
                                        int(step.numpy()), chief),
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
    eval_every: int  # Steps; None: --eval_every=never, no evaluation in this process.
    train_loop: object  # train_lib.make_train_loop's.
    evaluator: object  # evaluation.Evaluator: every eval set (None with --eval_every=never).
    agreement: object  # A --teacher's agreement with the model on the main eval set (research/distill.py), or {}.
    iterator: object  # Of the distributed training stream, from the step the run starts at.
    reporter: object
    stop_signal: list  # The signals received (_catch_stop_signals).


def _train(run):
    """Loops of steps up to the last step, each ending at an event (epoch end, evaluation, checkpoint, the end);
    returns (the last step, the last loop's train metrics, the last evaluation's results (_evaluate) or None)."""
    config = run.config
    restores, loops_run, train_metrics, last_eval = 0, 0, {}, None
    current = int(run.step.numpy())
    while current < run.total_steps:
        num_steps = min([config.steps_per_loop, run.total_steps - current] + [
            every - current % every for every in (run.steps_per_epoch, run.eval_every, config.checkpoint_every)
            if every])
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
        if run.eval_every and (current % run.eval_every == 0 or current == run.total_steps):
            last_eval = _evaluate(run, current, train_metrics)
            run.checkpoints.save_best(current, last_eval[0].scalars)
        saved = current % config.checkpoint_every == 0 or current == run.total_steps
        if saved:
            if not run.eval_every:  # The train scalars of this step on disk before its checkpoint appears: a
                run.reporter.flush()  # --follow sidecar records them beside its evaluation of the checkpoint.
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
    """The evaluation.Result of each eval set (--eval_split first) of the model at step `current` (its weight
    average with --ema_decay), reported; an unreadable eval example saves the training done and is one error line
    naming it."""
    with run.ema.swapped_in() if run.ema else contextlib.nullcontext():  # The reporter's pictures see them too.
        try:
            results = run.evaluator.evaluate()
        except evaluation.Unreadable as e:
            saved_at = run.checkpoints.save(current)  # The training done so far is not lost with the eval.
            raise UserError(f"{e.what} (evaluating step {current}); training saved as {saved_at}; "
                            f"{e.advice}") from None
        teacher_metrics = run.agreement(run.evaluator.passes[0][1])  # With a --teacher: its agreement.
        run.reporter.scalars("eval", current, teacher_metrics)
        results[0].scalars.update(teacher_metrics)
        run.reporter.eval(current, results, {"elapsed_s": round(time.time() - run.started, 1),
                                             **{f"train_{k}": v for k, v in train_metrics.items()}})
    return results


def _finish(run, current, train_metrics, last_eval, chief):
    """The results (written to results.json by the chief, with each eval set's per-example records and, with
    --eval_figures, the curves: evaluation.write_final_records), evaluating the last step if no loop did; with
    --eval_every=never none at all: results.json's eval fields stay null for a `research.evaluate --follow` sidecar
    to fill in from the last checkpoint."""
    config = run.config
    if run.eval_every and not last_eval:
        last_eval = _evaluate(run, current, train_metrics)
    results = {"step": current, **evaluation.results_fields(last_eval), "train": train_metrics,
               "wall_time_s": round(time.time() - run.started, 1), "params": int(run.model.count_params()),
               "dataset": config.dataset, "model": config.model}
    if chief:
        run_dir.write_results(config.model_dir, results)
        if last_eval:
            evaluation.write_final_records(config.model_dir, last_eval, current, run.dataset.name,
                                           config.eval_figures)
    run.reporter.close()
    if last_eval:
        main = last_eval[0].scalars
        print(f"Done: step {current}, eval accuracy {metrics.interval_text(main)}, loss {main['loss']:.4f} "
              f"({results['wall_time_s']} s)")
    else:
        print(f"Done: step {current}, not evaluated (--eval_every=never): `python -m research.evaluate "
              f"--model_dir={config.model_dir} --follow` evaluates its checkpoints and completes results.json "
              f"({results['wall_time_s']} s)")
    return results


def _without_effect(config, dataset):
    """The flags whose change on a resume the loaded data shows to be without effect: --image_size where the model
    input is the one recorded (28 for MNIST's own 28, recorded as 0), --dataset where a folder moved (its loader
    found every recorded file under the new root)."""
    recorded = run_dir.recorded_dataset_info(config.model_dir) or {}
    loaded = json.loads(json.dumps(dataset.metadata().to_json()))  # (Tuples as lists, as read back from JSON.)
    same_input = {k: v for k, v in recorded.items() if k != "name"} == {k: v for k, v in loaded.items() if k != "name"}
    moved = bool(dataset.file_lists) and bool(run_dir.read_data_files(config.model_dir))
    return {name for name, unchanged in (("image_size", same_input), ("dataset", moved)) if unchanged}


def _with_recorded_init(config):
    """A resume starts from its own weights: the --init_checkpoint flags it was given are not this run's, so the
    recorded ones stay in flags.txt (and out of the resume guard and the flags history)."""
    recorded = run_dir.read_flags(config.model_dir) if run_dir.is_run(config.model_dir) else {}
    return config_lib.make_config(**{**run_dir.parse_flagfile(config_lib.to_flagfile(config), "the flags"),
                                     **{name: recorded.get(name) for name in transfer.INIT_FLAGS}})


def _profiling(config, current, num_steps, total_steps, loops_run):
    """A TensorBoard profile (model_dir/train, Profile tab) of this loop if --profile_steps asks for it: a step
    number inside it, 'first' for the first loop after the one that traced, 'last' for the final loop."""
    wanted = any(s.isdigit() and current < int(s) <= current + num_steps for s in config.profile_steps) or (
        "first" in config.profile_steps and loops_run == 1) or (
        "last" in config.profile_steps and current + num_steps == total_steps)
    if not wanted:
        return contextlib.nullcontext()
    return tf.profiler.experimental.Profile(fs.join(config.model_dir, "train"))


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
