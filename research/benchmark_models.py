"""Several models side by side, as timm's benchmark.py tabulates them: parameters, multiply-adds per image, and
training and inference images/s, `python -m research.benchmark_models --benchmark_models=keras/ResNet50,resnet50
--image_size=224 --batch_size=32 --benchmark_steps=10 --benchmark_warmup_steps=2 --benchmark_rounds=2`.

Each model trains on research.benchmark's synthetic data (one random batch of RGB images repeated by tf.data:
nothing read or decoded) through our own train loop, built as train_and_evaluate builds it (the training flags'
optimizer, precision policy, --jit_compile and strategy), and predicts the same batch in inference mode in a
tf.function on one device. Each figure is the best of --benchmark_rounds rounds of --benchmark_steps timed steps
after --benchmark_warmup_steps untimed ones (research.benchmark's flags: their defaults are sized for one model on
a GPU; on a CPU pass a few steps, as above). Multiply-adds are half of TF's profiler count of the forward pass
(research.models.forward_flops). The models start from scratch: weights do not change the speed. On a GPU the
same command, with --mixed_precision=mixed_bfloat16 --jit_compile as wanted, gives that device's table.
"""

import sys
import time

from absl import flags

from research import cli

if __name__ == "__main__":
    cli.start()

import tensorflow as tf  # noqa: E402

from research import UserError, benchmark, models  # noqa: E402
from research.config import TOOL, declare  # noqa: E402

declare(TOOL, flags.DEFINE_list("benchmark_models", [], "The registered models to measure, in table order."))
FLAGS = flags.FLAGS


def measure(config, image_size, num_classes, steps, warmup_steps, rounds):
    """One model's row: {model, params, gmacs, train_images_per_sec, infer_images_per_sec}."""
    tf.keras.backend.clear_session()  # The previous model's graphs and memory.
    tf.keras.utils.set_random_seed(config.seed)
    dataset = benchmark.synthetic_dataset(config, image_size, num_classes)
    ours = benchmark.build_train_loop(config, dataset)
    images = next(iter(dataset.input_fn(tf.distribute.InputContext())))[0]
    predict = tf.function(lambda x: ours.model(x, training=False), jit_compile=config.jit_compile)

    def train(num_steps):
        done = 0
        while done < num_steps:
            totals, steps_run, _ = ours.train_loop(ours.iterator,
                                                   tf.constant(min(config.steps_per_loop, num_steps - done)))
            totals.numpy()
            done += int(steps_run)

    def infer(num_steps):
        for _ in range(num_steps):
            logits = predict(images)
        logits.numpy()

    rates = {}
    for name, run in (("train", train), ("infer", infer)):
        run(max(warmup_steps, 1))  # At least one call: tracing is not timed.
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            run(steps)
            best = max(best, steps * config.batch_size / (time.perf_counter() - start))
        rates[name] = best
    return {"model": config.model, "params": int(ours.model.count_params()),
            "gmacs": models.forward_flops(ours.model, dataset.image_shape) / 2 / 1e9,
            "train_images_per_sec": rates["train"], "infer_images_per_sec": rates["infer"]}


def format_table(rows, config, image_size, rounds, steps):
    """A Markdown table, headed by what was measured where."""
    device = benchmark.device_peak_flops(config.mixed_precision)[0]
    lines = [f"{image_size} px, batch {config.batch_size}, {config.optimizer}, {config.mixed_precision}, "
             f"jit_compile={config.jit_compile}, on {device}; images/s, best of {rounds} rounds x {steps} steps", "",
             "| model | params (M) | GMACs | train img/s | infer img/s |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['gmacs']:.2f} | {r['train_images_per_sec']:.1f} | "
              f"{r['infer_images_per_sec']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv):
    cli.parse_flags(argv, __doc__)
    return cli.run(_from_flags)


def _from_flags(_):
    if not FLAGS.benchmark_models:
        raise UserError("--benchmark_models is required: the registered models to measure, comma-separated")
    unknown = [name for name in FLAGS.benchmark_models if name not in models.names()]
    if unknown:
        raise UserError(f"--benchmark_models: {', '.join(unknown)} unknown; `python -m research.models --list` "
                        "names them")
    for name in ("benchmark_steps", "benchmark_rounds"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name} must be positive, got {FLAGS[name].value}")
    image_size = FLAGS.image_size or benchmark.SYNTHETIC_IMAGE_SIZE
    rows = []
    for name in FLAGS.benchmark_models:
        FLAGS.model = name
        config = benchmark.config_from_flags()
        rows.append(measure(config, image_size, FLAGS.synthetic_classes, FLAGS.benchmark_steps,
                            FLAGS.benchmark_warmup_steps, FLAGS.benchmark_rounds))
        print(f"measured {name}", file=sys.stderr, flush=True)
    print(format_table(rows, config, image_size, FLAGS.benchmark_rounds, FLAGS.benchmark_steps))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
