"""What a run tells the researcher: console lines (a Keras progress bar on a terminal), TensorBoard scalars under
`model_dir/train` and `model_dir/eval`, and `metrics.jsonl` (one JSON line per evaluation).

Only the chief writes files; every worker still computes the numbers (reading them is a collective).
"""

import json
import os
import sys
import time

import tensorflow as tf


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
        self.progbar = None
        self.started = time.time()
        self.start_step = start_step
        if is_chief:
            self.writers = {name: tf.summary.create_file_writer(os.path.join(model_dir, name))
                            for name in ("train", "eval")}

    def scalars(self, kind, step, metrics):
        if self.is_chief:
            with self.writers[kind].as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(name, value)

    def train(self, step, metrics):
        """After each loop of steps: metrics are means over the loop (loss, accuracy) plus lr and images/s."""
        self.scalars("train", step, metrics)
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        shown = {k: metrics[k] for k in ("loss", "accuracy") if k in metrics}
        if self.tty:
            if self.progbar is None or in_epoch + 1 < self.progbar._seen_so_far:
                print(f"Epoch {epoch + 1}/{-(-self.total_steps // self.steps_per_epoch)}")
                self.progbar = tf.keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=list(shown))
            self.progbar.update(in_epoch + 1, list(shown.items()))
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
        self.scalars("eval", step, {k: v for k, v in metrics.items() if k in ("loss", "accuracy")})
        if self.tty and self.progbar is not None:
            print()
        self.progbar = None
        print(f"eval step {step}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
              f"({metrics['examples']} examples)", flush=True)
        if self.is_chief:
            with open(os.path.join(self.model_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self, results):
        """At the end of training, with the dict written to results.json."""
        self.flush()

    def flush(self):
        if self.is_chief:
            for writer in self.writers.values():
                writer.flush()
