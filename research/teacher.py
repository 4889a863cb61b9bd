"""Finding, building and restoring a run's `--teacher` (research/distill.py): `load(config, dataset, strategy)`.

The teacher is a trained run of this project, rebuilt from its directory as research.evaluate rebuilds one
(research/runs.py: its flags, its dataset.json, its model computing in float32) inside the strategy's scope, so
that every replica holds it, restored and frozen. What is refused, in one line each: a path that is not there
(a moved teacher is named by its new path: the weights are what is checked), a run that has not finished (name
one of its checkpoints to distill from it as it is now), the run itself, an export (distill from the run it was
exported from), a teacher of other classes than the dataset's (names or count), and one whose weights do not hash
to --teacher_sha256 (which the first start records in flags.txt, so that a resume refuses a changed teacher).
"""

import os

import tensorflow as tf

from research import UserError, checkpoint, distill, run_dir, runs

EXPORT_FILE = "saved_model.pb"  # What makes a directory an export (research/export.py) rather than a run.


def load(config, dataset, strategy):
    """The run's distill.Teacher, built in `strategy`'s scope and restored; sets config.teacher_sha256 to the hash
    of its weights (so that flags.txt records it and the resume guard compares it)."""
    source = config.teacher
    flag = f"--teacher={source}"
    run = os.path.dirname(source) if run_dir.exists(source + ".index") else source  # RUN/ckpt-N, RUN/best/ckpt-N.
    if os.path.basename(run.rstrip("/")) == run_dir.BEST_DIR and not run_dir.is_run(run):
        run = os.path.dirname(run.rstrip("/"))
    if _same_path(run, config.model_dir):
        raise UserError(f"{flag} is this run itself (--model_dir={config.model_dir}): a run cannot teach itself")
    if not (run_dir.exists(source) or run_dir.exists(source + ".index")):
        raise UserError(f"{flag} does not exist (a teacher that moved may be named by its new path: a resume "
                        "checks that its weights are the same)")
    if run_dir.exists(run_dir.join(source, EXPORT_FILE)):
        raise UserError(f"{flag} is an export; distill from the run it was exported from (its directory, or one "
                        "of its checkpoints), whose flags rebuild the network")
    paths = checkpoint.named_by(source, "--teacher", "a run directory or a directory of checkpoints")
    if not run_dir.is_run(run):
        raise UserError(f"{flag}: {run} is not a run directory (no {run_dir.FLAGS_FILE}), so the teacher's network "
                        "cannot be rebuilt")
    if run == source and run_dir.read_results(run) is None:
        raise UserError(f"{flag} has not finished training (no {run_dir.RESULTS_FILE}); name one of its "
                        f"checkpoints ({run_dir.join(run, 'ckpt-N')}) to distill from it as it is now")
    teacher_config, info = runs.read_config(run), runs.read_dataset_info(run)
    if list(info.class_names) != list(dataset.class_names):
        raise UserError(f"{flag} classifies {len(info.class_names)} classes ({_listed(info.class_names)}), "
                        f"{dataset.name} has {dataset.num_classes} ({_listed(dataset.class_names)}): a teacher "
                        "must know the dataset's classes, in the same order")
    with strategy.scope():
        model = runs.build_model(teacher_config, info)
    model.trainable = False
    restored = checkpoint.restore_newest_readable(model, paths, average=bool(teacher_config.ema_decay))
    variables = checkpoint.model_state(model)
    digest = distill.weights_sha256(variables)
    if config.teacher_sha256 and config.teacher_sha256 != digest:
        raise UserError(f"{flag}: its weights ({restored}) hash to {digest}, not to --teacher_sha256="
                        f"{config.teacher_sha256}: another teacher than the one named")
    config.teacher_sha256 = digest
    print(f"Teacher: {restored} (--model={teacher_config.model}, {model.count_params():,} parameters, weights "
          f"sha256 {digest[:16]}...); --distill_alpha={config.distill_alpha} "
          f"--distill_temperature={config.distill_temperature}")
    convert = _input_conversion(dataset.preprocessing, info.preprocessing)
    return distill.Teacher(lambda inputs: model(convert(inputs), training=False), variables, config)


def _same_path(a, b):
    if run_dir.is_url(a) or run_dir.is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _listed(names, shown=5):
    return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")


def _input_conversion(student, teacher):
    """Student model inputs -> the teacher's (research/data/preprocess.py's Preprocessing of each): the same
    tensor where both preprocess alike; else back to [0, 1] pixels, to the teacher's channels and size (the
    student's view, resized whole), and the teacher's normalization."""
    if (student.image_size, student.channels, student.normalize) == (
            teacher.image_size, teacher.channels, teacher.normalize):
        return lambda inputs: inputs

    def convert(inputs):
        pixels = student.for_display(tf.cast(inputs, tf.float32))
        if teacher.channels != student.channels:
            pixels = tf.image.grayscale_to_rgb(pixels) if teacher.channels == 3 else tf.image.rgb_to_grayscale(pixels)
        if tuple(teacher.image_size) != tuple(student.image_size):
            pixels = tf.image.resize(pixels, teacher.image_size)
        return teacher.normalized(pixels)

    return convert
