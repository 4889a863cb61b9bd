"""What a run tells the researcher: console lines (a Keras progress bar on a terminal), `metrics.jsonl` (one JSON
line per evaluation), and TensorBoard: scalars under `model_dir/train` and `model_dir/eval`; a grid of training
inputs as the model sees them (after augmentation); at each evaluation the confusion matrix and the misclassified
eval examples; weight histograms every --histogram_every steps; and the run's flags as HParams, in `model_dir`
itself, so that TensorBoard pointed at a sweep's parent directory lines its runs up in the HParams dashboard.

Only the chief writes files; every worker still computes the numbers (reading them is a collective).
"""

import sys
import time

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from research import config as config_lib, data, plots, run_dir

INPUTS_SHOWN = 36  # Training inputs in the grid.
MISTAKES_SCANNED = 1000  # Eval examples searched for mistakes at each evaluation...
MISTAKES_SHOWN = 25  # ...and how many of those found are shown.
# The HParams dashboard's metric columns: the last value of these scalars, i.e. of the final evaluation.
HPARAMS_METRICS = [hp.Metric(tag, group=group, display_name=f"{group} {tag}")
                   for group in ("eval", "train") for tag in ("accuracy", "loss")]


def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Reporter:
    """Created by the train loop after the model is built; `dataset` is a research.data.Dataset."""

    def __init__(self, config, dataset, model, total_steps, steps_per_epoch, start_step, is_chief=True):
        self.config, self.dataset, self.model = config, dataset, model
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
        self.eval_sample = None
        self.histograms_at = start_step
        if is_chief:
            self.writers = {name: tf.summary.create_file_writer(run_dir.join(model_dir, name))
                            for name in ("train", "eval")}
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

    def eval(self, step, metrics, confusion):
        """After each evaluation: console line, eval scalars, one metrics.jsonl line. `confusion` is the
        [true, predicted] count matrix over the whole eval split."""
        self.scalars("eval", step, {k: v for k, v in metrics.items() if k in ("loss", "accuracy", "top5_accuracy")})
        if self.tty and step % self.steps_per_epoch:
            print()  # Leave the unfinished progress bar's line.
        top5 = f" top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""
        print(f"eval step {step}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f}{top5} "
              f"({metrics['examples']} examples)", flush=True)
        if self.is_chief:
            run_dir.append_metrics(self.model_dir, {"step": step, **metrics})
            self.image("eval", "confusion_matrix", step, plots.confusion(confusion, self.dataset.class_names))
            self.image("eval", "misclassified", step, self._misclassified())

    def flush(self):
        """Writes out what the summary writers hold (at the end of training)."""
        if self.is_chief:
            for writer in self.writers.values():
                writer.flush()

    def image(self, kind, tag, step, figure):
        """A matplotlib figure as an image summary."""
        if self.is_chief:
            with self.writers[kind].as_default(step=step):
                tf.summary.image(tag, tf.image.decode_png(plots.to_png(figure), channels=3)[None])

    def _write_hparams(self):
        """The flags as HParams: the experiment (which hparams and metrics exist) and this run's values. Every run
        writes the same experiment, with no domains, so whichever run's copy TensorBoard picks fits them all."""
        names = config_lib.names_with(config_lib.CHECKPOINT, config_lib.TUNABLE)  # Not PATH: where, not how.
        values = {name: ",".join(map(str, value)) if isinstance(value, list) else value
                  for name in names if (value := getattr(self.config, name)) is not None}
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

    def _misclassified(self):
        """The Keras tutorial's prediction grid for the mistakes among the first eval examples."""
        if self.eval_sample is None:  # Read once through the eval pipeline: the inputs as evaluation sees them.
            self.eval_sample = data.first_eval_examples(self.dataset, self.config, MISTAKES_SCANNED)
        inputs, labels = self.eval_sample
        batch = 250  # Eager calls: few and large.
        probabilities = np.concatenate([tf.nn.softmax(self.model(inputs[i:i + batch], training=False))
                                        for i in range(0, len(inputs), batch)])
        wrong = np.flatnonzero(np.argmax(probabilities, -1) != labels)
        shown = wrong[:MISTAKES_SHOWN]
        images = np.asarray(self.dataset.preprocessing.for_display(inputs[shown]))
        return plots.predictions(images, labels[shown], probabilities[shown], self.dataset.class_names,
                                 title=f"{len(wrong)} of the first {len(inputs)} eval examples misclassified")
