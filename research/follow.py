"""Continuous evaluation by a second process, the sidecar (Model Garden's continuous_eval, big_vision's evaluators):
`python -m research.evaluate --model_dir=RUN --follow` beside a run trained with `--eval_every=never`, e.g. the
training on the GPUs and the sidecar on the CPU (`CUDA_VISIBLE_DEVICES=`) or another device.

It evaluates each checkpoint the run saves, once, oldest first, and records it as the training's own evaluation would
have at that step: the eval and eval_<split> TensorBoard runs (scalars; the confusion matrix, reliability diagram and
most confident mistakes, unless the run has --noeval_figures), one metrics.jsonl line (with the train means that
the train TensorBoard run holds for that step, where they are already written), best/ (the checkpoint's files
copied); at the run's last step, results.json's eval fields, each set's per-example record and curves.png (unless
--noeval_figures). It may start before the training (it waits for the run directory and its first checkpoint) and
stops when the run has finished: results.json written, its step evaluated, no newer checkpoint, no training
running. When no training has been running there (no live LOCK) and nothing has been left to evaluate for
--timeout_s seconds (it died, or never started), it stops with one error line.

Safe beside the training:
- It never takes the training's LOCK; it only reads whether a live process holds it. LOCK.follow keeps one sidecar per
  run (a killed sidecar's is taken over by the next, as the training's is).
- It reads only the checkpoints the `checkpoint` index names (TensorFlow writes a checkpoint's files before the index
  names it), each copied first into a scratch directory of its own, so that the training removing it meanwhile
  (--keep_checkpoints) changes nothing. A copy or restore that fails is tried once more; a checkpoint whose files are
  gone by then was removed, and a warning line names it: the sidecar sees only the checkpoints still kept when it
  looks, so keep more (--keep_checkpoints) if it is slower than the training.
- The training writes no evaluation records with --eval_every=never, so metrics.jsonl, best/ and the eval runs are
  the sidecar's alone (a run that evaluates in its own loop is refused, also when a resume switches it to that). A
  resume's rewind removes only records of steps after the checkpoint it resumes from, which the training then saves
  again and the sidecar evaluates again.
- Exactly once, across kills: the steps evaluated are those of metrics.jsonl, read at every look, and a
  checkpoint's line is written after its TensorBoard summaries and best/; a sidecar killed in between evaluates that
  checkpoint again when restarted (TensorBoard may then show the same point twice).
Not recorded by it: a --teacher's agreement (in-loop evaluation only), elapsed_s (the training's clock).
"""

import contextlib
import posixpath
import tempfile
import time

import tensorflow as tf
from absl import logging
from tensorboard.backend.event_processing import plugin_event_accumulator

from research import (UserError, checkpoint as checkpoint_lib, cli, config as config_lib, evaluation, fs, lock,
                      reporting, run_dir, runs)


def follow(model_dir, poll_s=10.0, timeout_s=3600.0, **data_location):
    """Evaluates each checkpoint of the run in `model_dir` as it appears, until the run has finished; returns the
    steps this call evaluated. `data_location`: where the run's data is now (runs.data_location). Raises UserError
    when no training has been running there and nothing has been left to evaluate for `timeout_s` seconds."""
    fs.check_filesystem(model_dir)
    if fs.exists(model_dir) and not fs.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} is a file, not a run directory")
    print(f"Following {model_dir}: each checkpoint is evaluated as it appears, until the run finishes", flush=True)
    with contextlib.ExitStack() as stack:
        follower = _Follower(model_dir, data_location, stack.enter_context(tempfile.TemporaryDirectory()))
        idle_since, locked = time.time(), False
        while True:
            if not locked and run_dir.is_run(model_dir):
                stack.enter_context(lock.Lock(model_dir, name=run_dir.FOLLOW_LOCK_FILE))
                locked = True
            if locked and follower.evaluate_next():
                idle_since = time.time()
                continue
            if locked and follower.finished():
                print(f"Followed {model_dir} to its end at step {follower.final_step}: evaluated "
                      f"{len(follower.evaluated)} checkpoint{'' if len(follower.evaluated) == 1 else 's'} here"
                      f"{_steps(follower.evaluated)}", flush=True)
                return follower.evaluated
            if lock.training_alive(model_dir):
                idle_since = time.time()
            elif time.time() - idle_since >= timeout_s:
                raise UserError(f"{model_dir}: no training has been running there (no live {run_dir.LOCK_FILE}) and "
                                f"no checkpoint has been left to evaluate for {timeout_s:g} s; {follower.state()} "
                                f"(evaluated here{_steps(follower.evaluated) or ': none'}): rerun --follow with its "
                                "training")
            time.sleep(poll_s)


def _steps(steps):
    return f" (steps {', '.join(map(str, steps))})" if steps else ""


class _Follower:
    """The sidecar's state between looks at the run directory: the evaluator (rebuilt when flags.txt changes), the
    checkpoints seen listed, and the last evaluation (for results.json)."""

    def __init__(self, model_dir, data_location, scratch):
        self.model_dir, self.data_location, self.scratch = model_dir, data_location, scratch
        self.flags_text, self.config, self.model, self.evaluator = None, None, None, None
        self.seen, self.skipped, self.evaluated = set(), set(), []
        self.last = None  # (step, evaluation.Result of each set) of the last evaluation.
        self.final_step = None
        self.train_scalars = _TrainScalars(fs.join(model_dir, "train"))

    # ------------------------------------------------------------------------------------------------ A look
    def evaluate_next(self):
        """Evaluates and records the oldest checkpoint the index names that is not evaluated yet; returns whether
        there was one."""
        self._check_flags()
        listed, done = self._listed(), self._done()
        if listed is None:
            return False
        for step in sorted(self.seen - set(listed) - done - self.skipped):
            if not fs.exists(fs.join(self.model_dir, f"ckpt-{step}.index")):
                self._skip(step, "was removed by the training (--keep_checkpoints) before this sidecar read it")
        self.seen |= set(listed)
        waiting = sorted(set(listed) - done - self.skipped)
        if not waiting:
            return False
        step = waiting[0]
        copy = self._restored(step, listed[step])
        if copy is not None:
            self._record(step, self.evaluator.evaluate(), copy)
        return True

    def finished(self):
        """Whether the run has finished with every record written: results.json's step evaluated (and, when the
        evaluation came before results.json, its eval fields filled in now), no newer checkpoint, no training
        running."""
        results = run_dir.read_results(self.model_dir)
        if results is None or results["step"] not in self._done():
            return False
        step = results["step"]
        if max(self._listed() or [step]) > step or lock.training_alive(self.model_dir):
            return False  # A finished run continued (a longer --train_steps) is followed on.
        if results.get("eval") is None:
            if not self.last or self.last[0] != step:  # (Evaluated by a sidecar killed before it completed it.)
                copy = self._restored(step, f"ckpt-{step}")
                if copy is None:
                    return False
                self.last = (step, self.evaluator.evaluate())
            self._complete(*self.last)
        self.final_step = step
        return True

    def state(self):
        """Why the run is not finished, in words, for the line that gives up on it."""
        if not run_dir.is_run(self.model_dir):
            return "it holds no run (no flags.txt)" if fs.exists(self.model_dir) else "it does not exist"
        results = run_dir.read_results(self.model_dir)
        if results is not None and results["step"] in self.skipped:
            return f"its last checkpoint, ckpt-{results['step']}, could not be evaluated (see the warning above)"
        return "its training has not finished (no results.json)" if results is None else "its run has not finished"

    # ------------------------------------------------------------------------------------------------ Reading
    def _check_flags(self):
        """Reads flags.txt again when it changed (a resume): the run must still train without evaluating (or its
        evaluations would be recorded twice); a change of eval sets rebuilds the evaluator."""
        text = fs.read_text(fs.join(self.model_dir, run_dir.FLAGS_FILE))
        if text == self.flags_text:
            return
        overrides = runs.data_location(self.model_dir, **self.data_location)
        config = runs.read_config(self.model_dir, **overrides, train_split=None)  # (Evaluation reads no training.)
        if config.eval_every != config_lib.NEVER:
            raise UserError(f"{self.model_dir} is evaluated by its training (--eval_every="
                            f"{config_lib.spelled(config.eval_every)}): --follow is for runs trained with "
                            f"--eval_every=never, or every evaluation would be recorded twice")
        info = runs.read_dataset_info(self.model_dir)
        self.model = self.model or runs.build_model(config, info)
        dataset = runs.load_dataset(self.model_dir, runs.Restored(self.model, config, info, None, None), **overrides,
                                    train_split=None)
        self.evaluator = evaluation.Evaluator(tf.distribute.get_strategy(), self.model, dataset, config)
        self.flags_text, self.config = text, config

    def _listed(self):
        """{step: checkpoint name} of what the `checkpoint` index names now, or None while it cannot be read (being
        repaired by a resume): look again later."""
        try:
            state = tf.train.get_checkpoint_state(self.model_dir)
        except Exception:  # noqa: BLE001 - a damaged index is the training's to repair (checkpoint._repair_index).
            return None
        names = [posixpath.basename(path) for path in state.all_model_checkpoint_paths] if state else []
        return {runs.checkpoint_step(name): name for name in names if runs.checkpoint_step(name) is not None}

    def _done(self):
        return {record["step"] for record in run_dir.read_metrics(self.model_dir)}

    def _restored(self, step, name):
        """Copies checkpoint `name` into the scratch directory and restores the model's weights (their moving average
        for a run with --ema_decay, as its evaluations use) from the copy; tried twice. Returns the copy's prefix, or
        None where the checkpoint was removed meanwhile or stays unreadable (a warning line says which)."""
        source, copy = fs.join(self.model_dir, name), fs.join(self.scratch, name)
        for _ in range(2):
            try:
                for path in fs.glob(f"{copy}.*"):
                    fs.remove(path)
                for path in fs.glob(f"{source}.*"):
                    fs.gfile().copy(path, fs.join(self.scratch, posixpath.basename(path)), overwrite=True)
                checkpoint_lib.restore_weights(self.model, copy, average=bool(self.config.ema_decay))
                return copy
            except (tf.errors.OpError, checkpoint_lib.Unreadable) as e:
                error = (cli.op_error_line(e) if isinstance(e, tf.errors.OpError) else str(e)).replace(copy, source)
        if not fs.exists(f"{source}.index"):
            self._skip(step, "was removed by the training (--keep_checkpoints) before this sidecar read it")
        else:
            self._skip(step, f"could not be read twice ({error})")
        return None

    def _skip(self, step, why):
        logging.warning("%s %s: not evaluated", fs.join(self.model_dir, f"ckpt-{step}"), why)
        self.skipped.add(step)

    # ------------------------------------------------------------------------------------------------ Writing
    def _record(self, step, results, copy):
        """Records an evaluation as the training's in-loop evaluation would: TensorBoard, best/, then (the commit)
        its metrics.jsonl line; at the run's last step, results.json's eval fields and the final records too."""
        reporting.print_eval(step, results)
        writers = {result.tag: tf.summary.create_file_writer(fs.join(self.model_dir, result.tag)) for result in results}
        try:  # A writer per evaluation: a resume that starts the run anew may remove the eval runs meanwhile.
            reporting.write_eval_summaries(writers, step, results, self.evaluator, self.config.eval_figures)
        finally:
            for writer in writers.values():
                writer.close()
        checkpoint_lib.keep_as_best(self.model_dir, copy, step, results[0].scalars)
        run_dir.append_metrics(self.model_dir, reporting.eval_record(step, results, self.train_scalars.at(step)))
        self.evaluated.append(step)
        self.last = (step, results)
        finished = run_dir.read_results(self.model_dir)
        if finished is not None and finished["step"] == step:
            self._complete(step, results)

    def _complete(self, step, results):
        """The run's final records from the evaluation of its last checkpoint: each set's per-example record and
        curves.png, then results.json's eval fields (null until then: the training never evaluated)."""
        evaluation.write_final_records(self.model_dir, results, step, self.evaluator.dataset.name,
                                       self.config.eval_figures)
        finished = run_dir.read_results(self.model_dir)
        run_dir.write_results(self.model_dir, {**finished, **evaluation.results_fields(results)})


class _TrainScalars:
    """The train means the training wrote to its train TensorBoard run, read as the event files grow (the training
    flushes them before each checkpoint): what an in-loop evaluation's metrics.jsonl line holds as train_*."""

    def __init__(self, path):
        self.path, self.events = path, None

    def at(self, step):
        """{train_<name>: value} of every scalar the train run holds at `step`; {} where there is none yet."""
        try:
            if self.events is None:
                self.events = plugin_event_accumulator.EventAccumulator(self.path, tensor_size_guidance={"scalars": 0})
            self.events.Reload()
            tags = [tag for tag in self.events.Tags()["tensors"]
                    if self.events.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"]
            return {f"train_{tag}": float(tf.make_ndarray(event.tensor_proto))
                    for tag in tags for event in self.events.Tensors(tag) if event.step == step}
        except Exception:  # noqa: BLE001 - no train run (yet, or removed): the line has no train means.
            self.events = None
            return {}
