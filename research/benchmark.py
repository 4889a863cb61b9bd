"""Our train loop's speed against Keras fit, same model and data: `python -m research.benchmark --flagfile=...`.

Why it exists: the hand-written loop in research/train_lib.py is only worth its code if it is faster than `model.fit`.
This measures, in one process and on the same tf.data input, after warm-up:
  - ours: `make_train_loop` built exactly as `train_and_evaluate` builds it, timed over calls of --steps_per_loop
    steps on the real distributed iterator;
  - Keras compile/fit on a fresh copy of the network (same optimizer type, sparse cross-entropy from logits,
    accuracy metric) with steps_per_execution=1 (fit's default) and --fit_steps_per_execution (its best case),
    timed by a callback between batches, so that fit's own set-up is left out as our warm-up is;
  - the input pipeline alone, so that a slow loop can be told apart from a starved one;
  - seconds from process start (psutil's create_time) to the first completed training step.
The methods take turns over --benchmark_rounds rounds and each reports its best round: on a shared machine the
least-disturbed round is the closest to the method's own speed; the spread over rounds shows the noise.
It takes the training flags (--flagfile works); --model_dir and the run length are optional: nothing is written.

For GPU speed without a dataset: `--synthetic_data --model=resnet50` (at --image_size, 224 if unset) trains on one random batch
repeated by tf.data (nothing read, decoded, gathered or augmented; prefetched to the device, for both loops), and
`--compare_precisions` measures float32, mixed_bfloat16 and mixed_float16, each without and with --jit_compile,
in one process. Model FLOP utilisation is the achieved training FLOP/s (3 x the forward pass's profiler count per
image) over the device's peak for the precision, from PEAK_TFLOPS; unknown devices (and CPUs) say so.
--input_only measures the input pipeline alone instead (research/data/input_benchmark.py): images/s with 1 thread
and with every core, next to a bare decode-crop-resize loop over the same image files, peak memory, and the time to
the first batch.
--nobenchmark_fit times our loop alone (the peak memory is then its own: --grad_accum_steps=1 against 4, in two
processes); --cpu_devices=N splits the CPU into N devices, so that --strategy=mirrored has N replicas without GPUs.
"""

import json
import os
import resource
import sys
import time
import types

from absl import flags, logging

from research import cli, config as config_lib  # Standard library and absl only: they run before TensorFlow loads.

if __name__ == "__main__":
    cli.start()

import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import UserError, data, distribute, models, optim, train_lib, transfer  # noqa: E402
from research.config import TOOL, declare  # noqa: E402
from research.data import input_benchmark  # noqa: E402

declare(TOOL, flags.DEFINE_integer("benchmark_steps", 600, "Timed training steps per method and round."))
declare(TOOL, flags.DEFINE_integer(
    "benchmark_warmup_steps", 100,
    "Untimed steps before each method's timed ones (tracing, tf.data autotuning). Not --warmup_steps: "
    "that one is the learning-rate warm-up."))
declare(TOOL, flags.DEFINE_integer(
    "benchmark_rounds", 3, "Rounds in which the methods take turns; each method reports its best."))
declare(TOOL, flags.DEFINE_integer(
    "fit_steps_per_execution", None,
    "Keras fit's large steps_per_execution (default: --steps_per_loop)."))
declare(TOOL, flags.DEFINE_integer("input_steps", 5000, "Batches read when timing the input pipeline alone."))
declare(TOOL, flags.DEFINE_boolean("json", False, "Print one JSON object instead of the table."))
declare(TOOL, flags.DEFINE_boolean(
    "synthetic_data", False,
    "Train on one random batch of --image_size (default 224) RGB images and --synthetic_classes classes, repeated: "
    "the speed of the model and loop alone."))
SYNTHETIC_IMAGE_SIZE = 224  # --synthetic_data without --image_size: ImageNet's.
declare(TOOL, flags.DEFINE_integer("synthetic_classes", 1000, "--synthetic_data: number of classes."))
declare(TOOL, flags.DEFINE_boolean(
    "compare_precisions", False,
    "Run the benchmark for float32, mixed_bfloat16 and mixed_float16, each without and with "
    "--jit_compile (ignoring those two flags), and print one table."))
declare(TOOL, flags.DEFINE_boolean(
    "input_only", False,
    "Measure only the training input pipeline (--input_steps batches, with 1 thread and every "
    "core), beside a bare decode-crop-resize loop over the same image files; no model."))
declare(TOOL, flags.DEFINE_boolean(
    "benchmark_fit", True,
    "Also time Keras fit on a copy of the network; --nobenchmark_fit times our loop alone, so that the peak "
    "memory reported is our step's."))
declare(TOOL, flags.DEFINE_integer(
    "cpu_devices", 1,
    "Split the CPU into this many logical devices, so that --strategy=mirrored has that many replicas without "
    "GPUs (how the all-reduce's cost shows on a CPU-only machine)."))

FLAGS = flags.FLAGS

# Dense peak TFLOP/s per precision, from NVIDIA's datasheets (without sparsity), looked up by the first name that
# occurs in the device's name. TensorFlow runs float32 matrix products and convolutions as TF32 on Ampere and later
# GPUs (tf.config.experimental.enable_tensor_float_32_execution is on by default), so float32 gets the TF32 peak.
PEAK_TFLOPS = {  # name: (float32, mixed_bfloat16, mixed_float16); None where the GPU has no such tensor cores.
    "H200": (494.7, 989.4, 989.4), "H100 PCIe": (378.0, 756.0, 756.0), "H100": (494.7, 989.4, 989.4),
    "A100": (156.0, 312.0, 312.0), "L40S": (183.0, 366.0, 366.0), "L4": (60.0, 121.0, 121.0),
    "V100": (15.7, None, 125.0), "T4": (8.1, None, 65.0),
}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def run(config, steps=600, warmup_steps=100, rounds=3, fit_steps_per_execution=None, input_steps=5000,
        synthetic=None, fit=True):
    """Runs every measurement; returns the results as a JSON-ready dict (what --json prints). `synthetic`:
    (image size, classes) to train on a repeated random batch (synthetic_dataset) instead of --dataset; `fit`:
    whether Keras fit is timed too."""
    started = time.time()
    fit_spe = fit_steps_per_execution or config.steps_per_loop
    for name, value, least in (("benchmark_steps", steps, 1), ("benchmark_warmup_steps", warmup_steps, 0),
                               ("benchmark_rounds", rounds, 1), ("fit_steps_per_execution", fit_spe, 1),
                               ("input_steps", input_steps, 1)):
        if value < least:
            raise UserError(f"--{name} must be {'positive' if least else '>= 0'}, got {value}")
    tf.keras.utils.set_random_seed(config.seed)
    dataset = synthetic_dataset(config, *synthetic) if synthetic else data.load(config)
    loaded = time.time()
    ours = build_train_loop(config, dataset)
    built = time.time()
    ours.train_loop(ours.iterator, tf.constant(1))[0].numpy()
    first_step = time.time()

    def ours_steps_per_sec(num_steps):
        """Over `num_steps` steps in calls of --steps_per_loop, as train_and_evaluate calls the loop."""
        start, done = _clocks(), 0
        while done < num_steps:
            totals, steps_run, _ = ours.train_loop(ours.iterator,
                                                   tf.constant(min(config.steps_per_loop, num_steps - done)))
            totals.numpy()
            done += int(steps_run)
        return _per_sec(done, start, _clocks())

    if warmup_steps:
        ours_steps_per_sec(warmup_steps)
    fits = {f"fit_spe{spe}": _KerasFit(config, dataset, ours.strategy, ours.input_fn, ours.total_steps, spe)
            for spe in sorted({1, fit_spe})} if fit else {}
    samples = {"ours": [], **{name: [] for name in fits}}  # Per round: (steps/s, steps per CPU-second).
    for _ in range(rounds):  # Turns, so that a burst of load elsewhere hits one round of each, not one method.
        samples["ours"].append(ours_steps_per_sec(steps))
        for name, fit in fits.items():
            samples[name].append(fit.steps_per_sec(steps, warmup_steps))
    rates = {name: [wall * config.batch_size for wall, _ in values] for name, values in samples.items()}
    best = {name: max(values) for name, values in rates.items()}
    best_cpu = {name: max(cpu * config.batch_size for _, cpu in values) for name, values in samples.items()}
    fit_best = max(best[name] for name in fits) if fits else None
    input_rates = None if synthetic else {  # A repeated batch in memory: nothing worth timing.
        name: rate * config.batch_size
        for name, rate in _input_steps_per_sec(ours.strategy, ours.input_fn, input_steps).items()}
    train_flops = 3 * models.forward_flops(ours.model, dataset.image_shape)
    gpus = [d.name.split(":", 1)[1] for d in tf.config.list_logical_devices("GPU")]
    device_name, peak = device_peak_flops(config.mixed_precision)
    achieved = {name: rate * train_flops for name, rate in best.items()}
    return {
        "dataset": dataset.name, "model": config.model, "optimizer": config.optimizer,
        "image_shape": list(dataset.image_shape),
        "batch_size": config.batch_size, "steps_per_loop": config.steps_per_loop,
        "strategy": type(ours.strategy).__name__, "replicas": ours.strategy.num_replicas_in_sync,
        "device": f"{len(gpus)} x {device_name}" if gpus else f"CPU, {os.cpu_count()} cores",
        "threads_intra_inter": [tf.config.threading.get_intra_op_parallelism_threads(),
                                tf.config.threading.get_inter_op_parallelism_threads()],
        "jit_compile": config.jit_compile, "mixed_precision": config.mixed_precision,
        "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds,
        "images_per_sec": best, "images_per_sec_rounds": rates, "images_per_cpu_sec": best_cpu,
        "ratio_vs_fit_default": best["ours"] / best["fit_spe1"] if fits else None,
        "ratio_vs_fit_best": best["ours"] / fit_best if fits else None, "grad_accum_steps": config.grad_accum_steps,
        "input_images_per_sec": input_rates,
        "input_vs_ours": input_rates and input_rates["distributed"] / best["ours"],
        "train_flops_per_image": train_flops,
        "flops_method": "3 x the forward pass's float_operation count from tf.compat.v1.profiler",
        "achieved_flops_per_sec": achieved,
        "peak_flops_per_sec": peak and peak * len(gpus),
        "model_flop_utilization": {name: peak and flops / (peak * len(gpus)) for name, flops in achieved.items()},
        "params": int(ours.model.count_params()),
        "train_loop_traces": ours.train_loop.experimental_get_tracing_count(),
        "first_step_s": first_step - psutil.Process().create_time(),
        "first_step_from": "process start (psutil create_time)",
        "first_step_breakdown_s": {"python_start_and_imports": started - psutil.Process().create_time(),
                                   "load_data": loaded - started, "build": built - loaded,
                                   "trace_and_first_step": first_step - built},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux counts KiB.
        "peak_gpu_bytes": sum(tf.config.experimental.get_memory_info(g)["peak"] for g in gpus) if gpus else None,
    }


def synthetic_dataset(config, image_size, num_classes):
    """What build_train_loop needs of a dataset, with one random batch of square RGB images in place of examples."""
    shape = (image_size, image_size, 3)
    if image_size < 1 or num_classes < 1:
        raise UserError("--image_size and --synthetic_classes must be positive")

    def input_fn(ctx):
        batch = ctx.get_per_replica_batch_size(config.batch_size)
        images = tf.random.stateless_uniform([batch, *shape], [config.seed, 0])
        labels = tf.random.stateless_uniform([batch], [config.seed, 1], 0, num_classes, tf.int64)
        return tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(tf.data.AUTOTUNE)

    return types.SimpleNamespace(name="synthetic", image_shape=shape, num_classes=num_classes,
                                 num_train=config.batch_size, input_fn=input_fn)


def device_peak_flops(precision):
    """(the first GPU's name, its peak FLOP/s at `precision` or None if unknown); ("CPU", None) without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU", None
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    peaks = next((peaks for known, peaks in PEAK_TFLOPS.items() if known in name), None)
    peak = peaks and peaks[PRECISIONS.index(precision)]
    return name, peak and peak * 1e12


def build_train_loop(config, dataset):
    """Strategy, model, optimizer, step, train_loop and distributed iterator, set up as train_and_evaluate does
    (determinism, precision policy and weight average included), so that the loop timed is the loop trained."""
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.create_strategy(config)
    _, total_steps = train_lib.run_length(config, dataset, strategy)
    model, optimizer, step, ema = train_lib.build(config, dataset, strategy, total_steps)
    input_fn = getattr(dataset, "input_fn", None) or data.train_input_fn(dataset, config, 0)
    return types.SimpleNamespace(
        strategy=strategy, model=model, optimizer=optimizer, step=step, total_steps=total_steps, input_fn=input_fn,
        train_loop=train_lib.make_train_loop(strategy, model, optimizer, step, config, ema),
        iterator=iter(strategy.distribute_datasets_from_function(input_fn)))


class _KerasFit:
    """A fresh copy of the network trained by Keras compile/fit on the same tf.data pipeline as ours, with the same
    --jit_compile (fit's own default, "auto", would pick XLA on GPUs only) and precision policy (set globally)."""

    def __init__(self, config, dataset, strategy, input_fn, total_steps, steps_per_execution):
        with strategy.scope():
            self.model = models.create(config, dataset)
            self.model(tf.zeros([1, *dataset.image_shape]))  # Built, for the optimizer's weight-decay exclusions.
            transfer.freeze(self.model, config)
            self.model.compile(optimizer=optim.create_optimizer(config, total_steps, self.model),
                               loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                               metrics=["accuracy"], steps_per_execution=steps_per_execution,
                               jit_compile=config.jit_compile)
        self.dataset = input_fn(tf.distribute.InputContext())  # One pipeline of global batches; fit splits them.
        self.steps_per_execution = steps_per_execution

    def steps_per_sec(self, steps, warmup_steps):
        """Steps/s between the batch starting after `warmup_steps` (and at least one execution) and a batch
        `steps` (rounded up to whole executions) later; one more execution follows so that the last is timed."""
        spe = self.steps_per_execution
        skip = max(1, -(-warmup_steps // spe)) * spe
        timed = -(-steps // spe) * spe
        timer = _BatchStartTimes()
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=skip + timed + spe, verbose=0, callbacks=[timer],
                       shuffle=False)  # tf.data input: fit would ignore shuffle and warn.
        return _per_sec(timed, timer.times[skip], timer.times[skip + timed])


class _BatchStartTimes(tf.keras.callbacks.Callback):
    """`_clocks()` at each batch start. Keras calls on_train_batch_begin synchronously after the previous
    execution returned; overriding nothing else keeps fit's asynchronous batch-end dispatch as it is by default."""

    def __init__(self):
        super().__init__()
        self.times = {}

    def on_train_batch_begin(self, batch, logs=None):
        self.times[batch] = _clocks()


def _clocks():
    """Wall and process CPU seconds. CPU seconds per step hardly change when other processes take turns on the
    cores, so images per CPU-second compares methods where images/s is noisy (it counts spinning threads too)."""
    return time.perf_counter(), time.process_time()


def _per_sec(steps, start, end):
    """(steps per wall second, steps per CPU second) between two `_clocks()` readings."""
    return steps / (end[0] - start[0]), steps / (end[1] - start[1])


def _input_steps_per_sec(strategy, input_fn, batches):
    """Batches/s of the training input alone: the distributed iterator read inside a tf.function as the train
    loop reads it, and the bare tf.data pipeline reduced in C++."""
    iterator = iter(strategy.distribute_datasets_from_function(input_fn))

    @tf.function
    def read(n):
        for _ in tf.range(n):
            next(iterator)

    def timed(fn, n):
        start = time.perf_counter()
        fn(tf.constant(n, tf.int64))
        return n / (time.perf_counter() - start)

    pipeline = input_fn(tf.distribute.InputContext())
    count = lambda n: pipeline.take(n).reduce(tf.constant(0, tf.int64), lambda c, _: c + 1).numpy()  # noqa: E731
    warmup = max(1, batches // 10)
    timed(read, warmup)
    count(warmup)
    return {"distributed": timed(read, batches), "tf_data": timed(count, batches)}


def format_table(r):
    """The results as the human-readable report."""
    names = {"ours": f"ours: make_train_loop ({r['steps_per_loop']} steps/call)"}
    names.update({name: f"keras fit, steps_per_execution={name[len('fit_spe'):]}"
                  for name in r["images_per_sec"] if name != "ours"})
    micro = f" in {r['grad_accum_steps']} micro-batches (ours)" if r["grad_accum_steps"] > 1 else ""
    lines = [f"{r['model']} on {r['dataset']} {r['image_shape']}, {r['optimizer']}, batch {r['batch_size']}{micro}; "
             f"{r['strategy']} ({r['replicas']} replica), {r['device']}; threads intra/inter "
             f"{r['threads_intra_inter']} (0 = TF's choice); jit_compile={r['jit_compile']}, {r['mixed_precision']} "
             "(both loops)",
             f"{r['rounds']} rounds x {r['steps']} timed steps after {r['warmup_steps']} warm-up; each method's best "
             f"round, and its worst-best range over rounds",
             "",
             f"{'':46} {'images/s':>9} {'range':>12} {'img/CPU-s':>10} {'GFLOP/s':>8} {'MFU':>6}"]
    for name, label in names.items():
        values = r["images_per_sec_rounds"][name]
        lines.append(f"{label:46} {r['images_per_sec'][name]:9.0f} {min(values):6.0f}-{max(values):<5.0f} "
                     f"{r['images_per_cpu_sec'][name]:10.0f} {r['achieved_flops_per_sec'][name] / 1e9:8.2f} "
                     f"{_percent(r['model_flop_utilization'][name]):>6}")
    inputs = r["input_images_per_sec"]
    if inputs:
        lines += [f"{'input only: distributed iterator, in a tf.function':52} {inputs['distributed']:9.0f}",
                  f"{'input only: tf.data pipeline, Dataset.reduce':52} {inputs['tf_data']:9.0f}"]
    breakdown = ", ".join(f"{k} {v:.1f}" for k, v in r["first_step_breakdown_s"].items())
    peak = r["peak_flops_per_sec"]
    lines += ["",
              (f"ours / fit default: {r['ratio_vs_fit_default']:.2f}x    ours / fit best: "
               f"{r['ratio_vs_fit_best']:.2f}x" if r["ratio_vs_fit_best"] else "(Keras fit not timed)")
              + (f"    input / ours: {r['input_vs_ours']:.1f}x" if inputs else "    (synthetic data: no input)"),
              f"model: {r['params']:,} parameters, {r['train_flops_per_image'] / 1e6:.1f} MFLOP per training image "
              f"({r['flops_method']})",
              f"MFU against the device's peak: {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown for this device'}",
              f"first training step done {r['first_step_s']:.1f} s after {r['first_step_from']}: {breakdown}",
              f"train_loop traced {r['train_loop_traces']} time(s) over all its calls",
              f"peak memory: {r['peak_rss_bytes'] / 2**20:.0f} MiB RSS (getrusage maxrss)"
              + (f", {r['peak_gpu_bytes'] / 2**20:.0f} MiB GPU" if r["peak_gpu_bytes"] is not None else "")]
    return "\n".join(lines)


def format_comparison(results):
    """One line per precision and XLA setting (--compare_precisions)."""
    first = results[0]
    fits = [name for name in first["images_per_sec"] if name != "ours"]
    lines = [f"{first['model']} on {first['dataset']} {first['image_shape']}, batch {first['batch_size']}, "
             f"{first['device']}; images/s, each method's best of {first['rounds']} rounds x {first['steps']} steps",
             "",
             f"{'precision':15} {'jit':4} {'ours':>9} " + " ".join(f"{'fit spe=' + name[len('fit_spe'):]:>12}"
                                                               for name in fits)
             + f" {'ours/fit best':>14} {'ours TFLOP/s':>13} {'MFU':>6}"]
    for r in results:
        rates = r["images_per_sec"]
        lines.append(f"{r['mixed_precision']:15} {'yes' if r['jit_compile'] else 'no':4} {rates['ours']:9.1f} "
                     + " ".join(f"{rates[name]:12.1f}" for name in fits)
                     + (f" {r['ratio_vs_fit_best']:13.2f}x" if r["ratio_vs_fit_best"] else f" {'n/a':>14}")
                     + f" {r['achieved_flops_per_sec']['ours'] / 1e12:13.3f} "
                     f"{_percent(r['model_flop_utilization']['ours']):>6}")
    return "\n".join(lines)


def _percent(fraction):
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def config_from_flags():
    """The training configuration; the benchmark writes no run directory and trains a fixed number of steps, so
    --model_dir and the run length (which sets the learning-rate schedule's length) may be left out."""
    if FLAGS.model_dir is None:
        FLAGS.model_dir = "(unused by the benchmark)"
    if FLAGS.train_steps is None and FLAGS.train_epochs is None:
        FLAGS.train_epochs = 1
    return config_lib.config_from_flags()


def main(argv):
    cli.parse_flags(argv, __doc__)
    return cli.run(_benchmark_from_flags)


def _benchmark_from_flags(_):
    config = config_from_flags()
    if FLAGS.cpu_devices < 1:
        raise UserError(f"--cpu_devices must be positive, got {FLAGS.cpu_devices}")
    if FLAGS.input_only and FLAGS.synthetic_data:
        raise UserError("--input_only measures a dataset's input pipeline, and --synthetic_data has none: give one")
    if FLAGS.synthetic_data and FLAGS["dataset"].present:
        logging.warning("--dataset=%s has no effect and is ignored: --synthetic_data trains on random images",
                        FLAGS.dataset)
    if FLAGS.cpu_devices > 1:  # Before TensorFlow initialises its devices: nothing above runs an op.
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                                   [tf.config.LogicalDeviceConfiguration()] * FLAGS.cpu_devices)
    if FLAGS.input_only:
        for name in ("input_steps", "benchmark_rounds"):
            if FLAGS[name].value < 1:
                raise UserError(f"--{name} must be positive, got {FLAGS[name].value}")
        results = input_benchmark.measure(config, data.load(config), FLAGS.input_steps, FLAGS.benchmark_rounds)
        print(json.dumps(results, indent=1) if FLAGS.json else input_benchmark.format_results(results))
        return
    synthetic = (config.image_size or SYNTHETIC_IMAGE_SIZE, FLAGS.synthetic_classes) if FLAGS.synthetic_data else None
    variants = [types.SimpleNamespace(**{**vars(config), "mixed_precision": precision, "jit_compile": jit})
                for precision in PRECISIONS for jit in (False, True)] if FLAGS.compare_precisions else [config]
    results = []
    for variant in variants:
        tf.keras.backend.clear_session()  # The previous variant's models and their memory.
        results.append(run(variant, FLAGS.benchmark_steps, FLAGS.benchmark_warmup_steps, FLAGS.benchmark_rounds,
                           FLAGS.fit_steps_per_execution, FLAGS.input_steps, synthetic, FLAGS.benchmark_fit))
    if FLAGS.json:
        print(json.dumps(results if FLAGS.compare_precisions else results[0], indent=1))
    else:
        print(format_comparison(results) if FLAGS.compare_precisions else format_table(results[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
