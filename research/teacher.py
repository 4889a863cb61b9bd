"""Finding, building and restoring a run's `--teacher` (research/distill.py): `load(config, dataset, strategy)`.

A teacher is a trained run of this project, rebuilt from its directory as research.evaluate rebuilds one
(research/runs.py: its flags, its dataset.json, its model computing in float32), or an export of one
(research/export.py: its serving signature, which carries the run's preprocessing), loaded inside the strategy's
scope, so that every replica holds it. What is refused, in one line each: a path that is not there (a moved
teacher is named by its new path: the weights are what is checked), a run that has not finished (name one of its
checkpoints to distill from it as it is now), the run itself, a teacher of other classes than the dataset's
(names or count, or order), and one whose weights do not hash to --teacher_sha256 (which the first start records
in flags.txt, so that a resume refuses a changed teacher)."""

import os

import tensorflow as tf

from research import UserError, checkpoint, distill, fs, run_dir, runs

EXPORT_FILE = "saved_model.pb"  # What makes a directory an export (research/export.py) rather than a run.


def load(config, dataset, strategy):
    """The run's distill.Teacher, built in `strategy`'s scope and restored; sets config.teacher_sha256 to the hash
    of its weights (so that flags.txt records it and the resume guard compares it)."""
    source = config.teacher
    flag = f"--teacher={source}"
    run = os.path.dirname(source) if fs.exists(source + ".index") else source  # RUN/ckpt-N, RUN/best/ckpt-N.
    if os.path.basename(run.rstrip("/")) == run_dir.BEST_DIR and not run_dir.is_run(run):
        run = os.path.dirname(run.rstrip("/"))
    if _same_path(run, config.model_dir):
        raise UserError(f"{flag} is this run itself (--model_dir={config.model_dir}): a run cannot teach itself")
    if not (fs.exists(source) or fs.exists(source + ".index")):
        raise UserError(f"{flag} does not exist (a teacher that moved may be named by its new path: a resume "
                        "checks that its weights are the same)")
    if fs.exists(fs.join(source, EXPORT_FILE)):
        logits_of, variables, described = _export_teacher(source, flag, dataset, strategy)
    else:
        logits_of, variables, described = _run_teacher(source, run, flag, dataset, strategy)
    digest = distill.weights_sha256(variables)
    if config.teacher_sha256 and config.teacher_sha256 != digest:
        raise UserError(f"{flag}: its weights hash to {digest}, not to --teacher_sha256={config.teacher_sha256}: "
                        "another teacher than the one named")
    config.teacher_sha256 = digest
    print(f"Teacher: {described}, weights sha256 {digest[:16]}...; --distill_alpha={config.distill_alpha} "
          f"--distill_temperature={config.distill_temperature}")
    return distill.Teacher(logits_of, variables, config)


def _run_teacher(source, run, flag, dataset, strategy):
    """(logits of student inputs, variables, description) of a run's checkpoint, rebuilt from its flags."""
    paths = checkpoint.named_by(source, "--teacher", "a run directory or a directory of checkpoints")
    if not run_dir.is_run(run):
        raise UserError(f"{flag}: {run} is not a run directory (no {run_dir.FLAGS_FILE}), so the teacher's network "
                        "cannot be rebuilt")
    if run == source and run_dir.read_results(run) is None:
        raise UserError(f"{flag} has not finished training (no {run_dir.RESULTS_FILE}); name one of its "
                        f"checkpoints ({fs.join(run, 'ckpt-N')}) to distill from it as it is now")
    teacher_config, info = runs.read_config(run), runs.read_dataset_info(run)
    _check_classes(flag, info.class_names, dataset)
    with strategy.scope():
        model = runs.build_model(teacher_config, info)
    model.trainable = False
    restored = checkpoint.restore_newest_readable(model, paths, average=bool(teacher_config.ema_decay))
    student, teacher = dataset.preprocessing, info.preprocessing
    same_inputs = (student.image_size, student.channels, student.normalize) == (
        teacher.image_size, teacher.channels, teacher.normalize)

    def logits_of(inputs):
        if not same_inputs:  # The student's view, resized whole, normalized as the teacher's inputs are.
            inputs = teacher.normalized(tf.image.resize(_pixels(student, inputs, teacher.channels), teacher.image_size))
        return model(inputs, training=False)

    return logits_of, checkpoint.model_state(model), (
        f"{restored} (--model={teacher_config.model}, {model.count_params():,} parameters)")


def _export_teacher(source, flag, dataset, strategy):
    """(logits of student inputs, variables, description) of an export (research/export.py): its serving_default
    signature gets the student's view as uint8 pixels and applies the run's own preprocessing; the log of its
    probabilities are logits (a softmax at any temperature gives back the same distribution as the network's)."""
    with strategy.scope():
        loaded = tf.saved_model.load(source)
    _check_classes(flag, [name.decode() for name in loaded.class_names.numpy()], dataset)
    serve = loaded.signatures["serving_default"]
    channels = serve.structured_input_signature[1]["images"].shape[-1]

    def logits_of(inputs):
        pixels = tf.cast(tf.round(_pixels(dataset.preprocessing, inputs, channels) * 255.0), tf.uint8)
        return tf.math.log(serve(images=pixels)["probabilities"])

    return logits_of, list(loaded.model_variables), f"{source} (an export)"


def _check_classes(flag, names, dataset):
    if list(names) != list(dataset.class_names):
        raise UserError(f"{flag} classifies {len(names)} classes ({_listed(names)}), {dataset.name} has "
                        f"{dataset.num_classes} ({_listed(dataset.class_names)}): a teacher must know the "
                        "dataset's classes, in the same order")


def _pixels(student, inputs, channels):
    """Student model inputs -> [0, 1] pixels of `channels` channels."""
    pixels = tf.clip_by_value(student.for_display(tf.cast(inputs, tf.float32)), 0.0, 1.0)
    if channels == student.channels:
        return pixels
    return tf.image.grayscale_to_rgb(pixels) if channels == 3 else tf.image.rgb_to_grayscale(pixels)


def _same_path(a, b):
    if fs.is_url(a) or fs.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _listed(names, shown=5):
    return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")
