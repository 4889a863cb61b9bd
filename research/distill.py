"""Knowledge distillation: a trained network (the teacher, `--teacher`) teaches the model being trained (the
student) inside the train step (Hinton et al. 2015; DeiT's and big_vision's "patient and consistent" teacher).

The teacher sees exactly the (micro-)batch the student trains on, after augmentation and mixing, converted to its
own input preprocessing where it differs; it runs in inference mode, outside every gradient (the train step
computes its logits before the gradient tape, and they pass through tf.stop_gradient), and never enters the
student's checkpoint. Per example the student's loss becomes

    (1 - alpha) * label loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

computed in float32 whatever --mixed_precision computes the student in; T^2 keeps the gradient's scale independent
of T. Teacher logits computed once, offline, would be wrong as soon as augmentation is random.

This module holds the flags, the loss and the `Teacher` the train step calls (research/train_lib.py imports it for
its flags, which a run's readers parse back from flags.txt); research/teacher.py finds, builds and restores one.
"""

import hashlib

import numpy as np
import tensorflow as tf
from absl import flags

from research import config as config_lib
from research.config import CHECKPOINT, TUNABLE, declare

SUM = tf.distribute.ReduceOp.SUM

declare(TUNABLE, flags.DEFINE_string(  # A path, like --init_checkpoint; what it holds is pinned by --teacher_sha256.
    "teacher", "",
    "Distill from this trained network: a run directory of a finished run (its latest checkpoint; its moving "
    "average if it trained one), or one checkpoint of a run (RUN/ckpt-N, RUN/best), of any model family. Its "
    "classes must be the dataset's. Only the student is trained and checkpointed."))
declare(CHECKPOINT, flags.DEFINE_string(
    "teacher_sha256", "",
    "SHA-256 of the teacher's weights: left empty, it is filled in when the run starts and recorded in flags.txt, "
    "so that a resume refuses a teacher whose weights differ (retrained, replaced) but follows one that moved; "
    "given, a teacher whose weights hash otherwise is refused."),
        only_if=lambda c: c.teacher, when="with --teacher")
declare(CHECKPOINT, flags.DEFINE_float(
    "distill_alpha", 0.5,
    "Weight of the distillation loss against the label loss (1: the teacher alone, pure function matching)."),
        only_if=lambda c: c.teacher, when="with --teacher")
declare(CHECKPOINT, flags.DEFINE_float(
    "distill_temperature", 1.0,
    "Temperature T of both softmaxes in the distillation loss (which is scaled by T^2)."),
        only_if=lambda c: c.teacher, when="with --teacher")


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 <= config.distill_alpha <= 1, f"--distill_alpha must be in [0, 1], got {config.distill_alpha}")
    config_lib.need(config.distill_temperature > 0,
                    f"--distill_temperature must be positive, got {config.distill_temperature}")
    digest = config.teacher_sha256
    config_lib.need(not digest or (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)),
                    f"--teacher_sha256={digest} is not a SHA-256 (64 lowercase hexadecimal digits)")


def loss(teacher_logits, student_logits, temperature):
    """Per example T^2 * KL(softmax(teacher / T) || softmax(student / T)), in float32. xlogy makes a class the
    teacher rules out entirely (probability 0) contribute 0, not 0 * -inf."""
    teacher_logits, student_logits = (tf.cast(t, tf.float32) / temperature for t in (teacher_logits, student_logits))
    p = tf.nn.softmax(teacher_logits)
    kl = tf.reduce_sum(tf.math.xlogy(p, p) - p * tf.nn.log_softmax(student_logits), axis=-1)
    return kl * temperature ** 2


def weights_sha256(variables):
    """SHA-256 over the dtypes, shapes and values of `variables`, in order: the teacher's identity."""
    digest = hashlib.sha256()
    for variable in variables:
        value = np.asarray(variable.numpy())
        digest.update(f"{value.dtype}{list(value.shape)};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class Teacher:
    """A frozen network that gives logits for the student's model inputs (research/teacher.py builds it).

    `logits_of(inputs)`: the teacher's logits for a batch of the student's model inputs, converted to its own
    input preprocessing where it differs. `variables`: its weights, by position (hashed into --teacher_sha256).
    """

    def __init__(self, logits_of, variables, config):
        self._logits_of = logits_of
        self.variables = variables
        self.alpha = config.distill_alpha
        self.temperature = config.distill_temperature

    def logits(self, inputs):
        """float32 logits, outside every gradient."""
        return tf.stop_gradient(tf.cast(self._logits_of(inputs), tf.float32))

    def mixed_loss(self, teacher_logits, student_logits, label_losses):
        """The per-example loss of the student with this teacher (module docstring), from both networks' logits
        for one (micro-)batch and the student's per-example label loss."""
        distilled = loss(teacher_logits, student_logits, self.temperature)
        return (1.0 - self.alpha) * tf.cast(label_losses, tf.float32) + self.alpha * distilled

    def make_agreement(self, strategy, model):
        """`agreement(distributed eval dataset)` -> {"teacher_agreement": the share of examples on which the
        student's top-1 class is the teacher's, "teacher_kl": mean KL(teacher || student) at temperature 1}, the
        student in inference mode."""

        def replica_agreement(images, labels, _):  # (Eval batches carry each example's index too.)
            student, teacher = tf.cast(model(images, training=False), tf.float32), self.logits(images)
            agree = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(student, -1), tf.argmax(teacher, -1)), tf.float32))
            return tf.stack([agree, tf.reduce_sum(loss(teacher, student, 1.0)),
                             tf.cast(tf.shape(labels)[0], tf.float32)])

        @tf.function
        def totals(dist_dataset):
            summed = tf.zeros([3])
            for batch in dist_dataset:
                summed += strategy.reduce(SUM, strategy.run(replica_agreement, args=batch), axis=None)
            return summed

        def agreement(dist_dataset):
            agree, kl, examples = totals(dist_dataset).numpy()
            return {"teacher_agreement": float(agree / examples), "teacher_kl": float(kl / examples)}

        return agreement
