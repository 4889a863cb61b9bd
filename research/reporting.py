"""What a run tells the researcher: console lines (a Keras progress bar on a terminal), `metrics.jsonl` (one JSON
line per evaluation), and TensorBoard: scalars under `model_dir/train`, `model_dir/eval` (--eval_split) and one
`model_dir/eval_<split>` per --extra_eval split; a grid of training inputs as the model sees them (after
augmentation); at each evaluation of --eval_split the confusion matrix, the reliability diagram and the most
confident mistakes (unless --noeval_figures); weight histograms every --histogram_every steps; and the run's flags as
HParams, in `model_dir` itself, so that TensorBoard pointed at a sweep's parent directory lines its runs up in the
HParams dashboard.

Only the chief writes files; every worker still computes the numbers (reading them is a collective).
"""

import sys
import time

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from research import config as config_lib, data, evaluation, fs, plots, run_dir

INPUTS_SHOWN = 36  # Training inputs in the grid.
EVAL_SCALARS = ("loss", "accuracy", "top5_accuracy", "ece", "macro_f1")  # Of each eval set, in TensorBoard.
# The HParams dashboard's metric columns: the last value of these scalars, i.e. of the final evaluation.
HPARAMS_METRICS = [hp.Metric(tag, group=group, display_name=f"{group} {tag}")
                   for group in ("eval", "train") for tag in ("accuracy", "loss")]


def eval_tags(config):
    """The TensorBoard runs of a run's evaluations: eval (--eval_split), eval_<split> for each --extra_eval split."""
    return ["eval", *(evaluation.tag_of(split) for split in config.extra_eval)]


def print_eval(step, results):
    for result in results:
        print(f"eval step {step}: {evaluation.summary_line(result)}", flush=True)


def write_eval_summaries(writers, step, results, evaluator, figures=True):
    """One evaluation in TensorBoard, as training's in-loop evaluation and a --follow sidecar both write it: each
    set's EVAL_SCALARS in its own run (`writers`: {tag: summary writer}), and with `figures` (the run's
    --eval_figures) in the eval run the --eval_split set's confusion matrix, reliability diagram and most confident
    mistakes (`evaluator`: the Evaluator)."""
    for result in results:
        with writers[result.tag].as_default(step=step):
            for name, value in result.scalars.items():
                if name in EVAL_SCALARS:
                    tf.summary.scalar(name, value)
    if not figures:
        return
    main = results[0]
    figures = {"confusion_matrix": plots.confusion(main.confusion, evaluator.dataset.class_names),
               "reliability": plots.reliability(main.bins, main.split),
               "misclassified": evaluator.mistakes_figure(main)}
    with writers["eval"].as_default(step=step):
        for tag, figure in figures.items():
            _image_summary(tag, figure)


def _image_summary(tag, figure):
    """A matplotlib figure as an image summary (within a writer's as_default)."""
    tf.summary.image(tag, tf.image.decode_png(plots.to_png(figure), channels=3)[None])


def eval_record(step, results, fields):
    """One evaluation's metrics.jsonl line: --eval_split's numbers at the top, then `fields` (training means, time),
    each --extra_eval split's under `extra_eval`."""
    main = results[0]
    extra = {result.split: {k: v for k, v in result.scalars.items() if k != "split"} for result in results[1:]}
    return {"step": step, **main.scalars, **fields, **({"extra_eval": extra} if extra else {})}


def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Reporter:
    """Created by the train loop after the model is built; `dataset` is a research.data.Dataset."""

    def __init__(self, config, dataset, model, evaluator, total_steps, steps_per_epoch, start_step, is_chief=True):
        self.config, self.dataset, self.model, self.evaluator = config, dataset, model, evaluator
        model_dir = self.model_dir = config.model_dir
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.is_chief = is_chief
        self.tty = sys.stdout.isatty()
        # On a terminal, a Keras progress bar per epoch, created when the epoch starts (its rate counts from
        # there); its "Epoch k/n" header is printed with its first update.
        self.progbar = self._new_progbar() if self.tty else None
        self.shown_epoch = None
        self.started = time.time()
        self.start_step = start_step
        self.inputs_written = False
        self.histograms_at = start_step
        # Which start of the run this is (0: the first), so that research.compare can add up each one's wall time.
        self.segment = max(len(run_dir.read_provenance(model_dir)) - 1, 0) if is_chief else 0
        if is_chief:  # (No eval runs where this process never evaluates: --eval_every=never.)
            self.writers = {name: tf.summary.create_file_writer(fs.join(model_dir, name)) for name in
                            ("train", *(eval_tags(config) if evaluator else ()))}
            self._write_hparams()

    def _new_progbar(self):
        return tf.keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["loss", "accuracy"])

    def scalars(self, kind, step, metrics):
        if self.is_chief:
            with self.writers[kind].as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(name, value)

    def train(self, step, metrics):
        """After each loop of steps: metrics are means over the loop (loss, accuracy) plus lr and images/s."""
        self.scalars("train", step, metrics)
        if self.is_chief:
            if not self.inputs_written:
                self._write_inputs(step)
            self._write_histograms(step)
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        shown = {k: metrics[k] for k in ("loss", "accuracy") if k in metrics}
        if self.tty:
            if self.shown_epoch != epoch:
                print(f"Epoch {epoch + 1}/{-(-self.total_steps // self.steps_per_epoch)}")
                self.shown_epoch = epoch
            self.progbar.update(in_epoch + 1, list(shown.items()))
            if in_epoch + 1 == self.steps_per_epoch:  # The bar ended its line; the next epoch starts now.
                self.progbar = self._new_progbar()
            return
        done = step - self.start_step
        eta = (time.time() - self.started) / max(done, 1) * (self.total_steps - step)
        print(f"step {step}/{self.total_steps} epoch {epoch + 1} "
              + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
              + f" lr {metrics['learning_rate']:.3g} {metrics['images_per_sec']:.0f} img/s ETA {_fmt_time(eta)}",
              flush=True)

    def eval(self, step, results, fields):
        """After each evaluation, with its evaluation.Result of each eval set (--eval_split first) and the `fields`
        its metrics.jsonl line adds (time, training means): console lines, TensorBoard, one metrics.jsonl line
        (eval_record)."""
        if self.tty and step % self.steps_per_epoch:
            print()  # Leave the unfinished progress bar's line.
        print_eval(step, results)
        if self.is_chief:
            write_eval_summaries(self.writers, step, results, self.evaluator, self.config.eval_figures)
            run_dir.append_metrics(self.model_dir, eval_record(step, results, {**fields, "segment": self.segment}))

    def flush(self):
        """The summaries written so far, on disk now (they are otherwise flushed every two minutes)."""
        if self.is_chief:
            for writer in self.writers.values():
                writer.flush()

    def close(self):
        """At the end of training: the event files are closed, not left to the garbage collector (a run directory
        on a filesystem being unmounted or made read-only must not be busy)."""
        if self.is_chief:
            for writer in self.writers.values():
                writer.close()

    def image(self, kind, tag, step, figure):
        """A matplotlib figure as an image summary."""
        if self.is_chief:
            with self.writers[kind].as_default(step=step):
                _image_summary(tag, figure)

    def _write_hparams(self):
        """The flags that change results as HParams (CHECKPOINT and TUNABLE: not where files are, nor the cadence or
        devices), in declaration order (dataset, model, optimization first): the experiment (which hparams and metrics
        exist) and this run's values, but for flags without effect here (--momentum with adam), left blank. Every
        run writes the same experiment, with no domains, so whichever run's copy TensorBoard picks fits them all."""
        names = config_lib.names_with(config_lib.CHECKPOINT, config_lib.TUNABLE)
        values = {name: ",".join(map(str, value)) if isinstance(value, list) else value
                  for name in names if (value := getattr(self.config, name)) is not None
                  and config_lib.has_effect(name, self.config)}
        writer = tf.summary.create_file_writer(self.model_dir)
        with writer.as_default():
            hp.hparams_config(hparams=[hp.HParam(name) for name in names],
                              metrics=HPARAMS_METRICS)
            hp.hparams(values)
        writer.close()

    def _write_inputs(self, step):
        """The first batch of the training stream, rebuilt by the same pipeline, labelled with class names."""
        batch = data.train_input_fn(self.dataset, self.config, 0)(tf.distribute.InputContext())
        inputs, labels = (t[:INPUTS_SHOWN] for t in next(iter(batch)))
        images, labels = np.asarray(self.dataset.preprocessing.for_display(inputs)), labels.numpy()
        captions = [str(self.dataset.class_names[label]) for label in labels]
        title = f"training inputs (--augment={','.join(self.config.augment) or 'none'})"
        self.image("train", "inputs", step, plots.image_grid(images, captions, title=title))
        self.inputs_written = True

    def _write_histograms(self, step):
        """Histograms of the float weights when a multiple of --histogram_every was passed since the last ones
        (loops of steps need not end on one)."""
        every = self.config.histogram_every
        if not every or step // every == self.histograms_at // every:
            return
        self.histograms_at = step
        with self.writers["train"].as_default(step=step):
            for variable in self.model.weights:
                if "float" in str(variable.dtype):
                    tf.summary.histogram(f"weights/{variable.path}", variable)
