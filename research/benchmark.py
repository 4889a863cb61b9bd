"""Our train loop's speed against Keras fit, same model and data: `python -m research.benchmark --flagfile=...`.

Why it exists: the hand-written loop in research/train.py is only worth its code if it is faster than `model.fit`.
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
--input_only measures the input pipeline alone instead (research/data/input_benchmark.py): images/s with 1 thread
and with every core, next to a bare decode-crop-resize loop over the same image files, peak memory, and the time to
the first batch.
"""

import json
import os
import resource
import sys
import time
import types

import psutil
import tensorflow as tf
from absl import app, flags, logging

from research import UserError, config as config_lib, data, distribute, models, optim, train
from research.data import input_benchmark

flags.DEFINE_integer("benchmark_steps", 600, "Timed training steps per method and round.")
flags.DEFINE_integer("benchmark_warmup_steps", 100,
                     "Untimed steps before each method's timed ones (tracing, tf.data autotuning). Not --warmup_steps: "
                     "that one is the learning-rate warm-up.")
flags.DEFINE_integer("benchmark_rounds", 3, "Rounds in which the methods take turns; each method reports its best.")
flags.DEFINE_integer("fit_steps_per_execution", None,
                     "Keras fit's large steps_per_execution (default: --steps_per_loop).")
flags.DEFINE_integer("input_steps", 5000, "Batches read when timing the input pipeline alone.")
flags.DEFINE_boolean("json", False, "Print one JSON object instead of the table.")
flags.DEFINE_boolean("input_only", False,
                     "Measure only the training input pipeline (--input_steps batches, with 1 thread and every "
                     "core), beside a bare decode-crop-resize loop over the same image files; no model.")

FLAGS = flags.FLAGS


def run(config, steps=600, warmup_steps=100, rounds=3, fit_steps_per_execution=None, input_steps=5000):
    """Runs every measurement; returns the results as a JSON-ready dict (what --json prints)."""
    started = time.time()
    fit_spe = fit_steps_per_execution or config.steps_per_loop
    for name, value, least in (("benchmark_steps", steps, 1), ("benchmark_warmup_steps", warmup_steps, 0),
                               ("benchmark_rounds", rounds, 1), ("fit_steps_per_execution", fit_spe, 1),
                               ("input_steps", input_steps, 1)):
        if value < least:
            raise UserError(f"--{name} must be {'positive' if least else '>= 0'}, got {value}")
    tf.keras.utils.set_random_seed(config.seed)
    dataset = data.load(config)
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
            for spe in sorted({1, fit_spe})}
    samples = {"ours": [], **{name: [] for name in fits}}  # Per round: (steps/s, steps per CPU-second).
    for _ in range(rounds):  # Turns, so that a burst of load elsewhere hits one round of each, not one method.
        samples["ours"].append(ours_steps_per_sec(steps))
        for name, fit in fits.items():
            samples[name].append(fit.steps_per_sec(steps, warmup_steps))
    rates = {name: [wall * config.batch_size for wall, _ in values] for name, values in samples.items()}
    best = {name: max(values) for name, values in rates.items()}
    best_cpu = {name: max(cpu * config.batch_size for _, cpu in values) for name, values in samples.items()}
    fit_best = max(best[name] for name in fits)
    input_rates = {name: rate * config.batch_size
                   for name, rate in _input_steps_per_sec(ours.strategy, ours.input_fn, input_steps).items()}
    train_flops = 3 * _forward_flops(ours.model, dataset.image_shape)
    gpus = [d.name.split(":", 1)[1] for d in tf.config.list_logical_devices("GPU")]
    return {
        "dataset": config.dataset, "model": config.model, "optimizer": config.optimizer,
        "batch_size": config.batch_size, "steps_per_loop": config.steps_per_loop,
        "strategy": type(ours.strategy).__name__, "replicas": ours.strategy.num_replicas_in_sync,
        "device": f"{len(gpus)} GPU" if gpus else f"CPU, {os.cpu_count()} cores",
        "threads_intra_inter": [tf.config.threading.get_intra_op_parallelism_threads(),
                                tf.config.threading.get_inter_op_parallelism_threads()],
        "jit_compile": config.jit_compile, "mixed_precision": config.mixed_precision,
        "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds,
        "images_per_sec": best, "images_per_sec_rounds": rates, "images_per_cpu_sec": best_cpu,
        "ratio_vs_fit_default": best["ours"] / best["fit_spe1"], "ratio_vs_fit_best": best["ours"] / fit_best,
        "input_images_per_sec": input_rates,
        "input_vs_ours": input_rates["distributed"] / best["ours"],
        "train_flops_per_image": train_flops,
        "flops_method": "3 x the forward pass's float_operation count from tf.compat.v1.profiler",
        "achieved_flops_per_sec": {name: rate * train_flops for name, rate in best.items()},
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


def build_train_loop(config, dataset):
    """Strategy, model, optimizer, step, train_loop and distributed iterator, set up as train_and_evaluate does
    (determinism, precision policy and weight average included), so that the loop timed is the loop trained."""
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.create_strategy(config)
    _, total_steps = train.run_length(config, dataset, strategy)
    model, optimizer, step, ema = train.build(config, dataset, strategy, total_steps)
    input_fn = data.train_input_fn(dataset, config, 0)
    return types.SimpleNamespace(
        strategy=strategy, model=model, optimizer=optimizer, step=step, total_steps=total_steps, input_fn=input_fn,
        train_loop=train.make_train_loop(strategy, model, optimizer, step, config, ema),
        iterator=iter(strategy.distribute_datasets_from_function(input_fn)))


class _KerasFit:
    """A fresh copy of the network trained by Keras compile/fit on the same tf.data pipeline as ours, with the same
    --jit_compile (fit's own default, "auto", would pick XLA on GPUs only) and precision policy (set globally)."""

    def __init__(self, config, dataset, strategy, input_fn, total_steps, steps_per_execution):
        with strategy.scope():
            self.model = models.create(config, dataset)
            self.model.compile(optimizer=optim.create_optimizer(config, total_steps),
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


def _forward_flops(model, image_shape):
    """Floating-point operations of one image's forward pass (inference mode), counted on its graph."""
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, *image_shape], tf.float32))
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # The profiler's shape helpers log v1 deprecation warnings.
    try:
        return tf.compat.v1.profiler.profile(forward.graph, options=options).total_float_ops
    finally:
        logger.setLevel(level)


def format_table(r):
    """The results as the human-readable report."""
    names = {"ours": f"ours: make_train_loop ({r['steps_per_loop']} steps/call)"}
    names.update({name: f"keras fit, steps_per_execution={name[len('fit_spe'):]}"
                  for name in r["images_per_sec"] if name != "ours"})
    lines = [f"{r['model']} on {r['dataset']}, {r['optimizer']}, batch {r['batch_size']}; {r['strategy']} "
             f"({r['replicas']} replica), {r['device']}; threads intra/inter {r['threads_intra_inter']} (0 = TF's "
             f"choice); jit_compile={r['jit_compile']}, {r['mixed_precision']} (both loops)",
             f"{r['rounds']} rounds x {r['steps']} timed steps after {r['warmup_steps']} warm-up; each method's best "
             f"round, and its worst-best range over rounds",
             "",
             f"{'':46} {'images/s':>9} {'range':>12} {'img/CPU-s':>10} {'GFLOP/s':>8}"]
    for name, label in names.items():
        values = r["images_per_sec_rounds"][name]
        lines.append(f"{label:46} {r['images_per_sec'][name]:9.0f} {min(values):6.0f}-{max(values):<5.0f} "
                     f"{r['images_per_cpu_sec'][name]:10.0f} {r['achieved_flops_per_sec'][name] / 1e9:8.2f}")
    inputs = r["input_images_per_sec"]
    lines += [f"{'input only: distributed iterator, in a tf.function':52} {inputs['distributed']:9.0f}",
              f"{'input only: tf.data pipeline, Dataset.reduce':52} {inputs['tf_data']:9.0f}"]
    breakdown = ", ".join(f"{k} {v:.1f}" for k, v in r["first_step_breakdown_s"].items())
    lines += ["",
              f"ours / fit default: {r['ratio_vs_fit_default']:.2f}x    ours / fit best: {r['ratio_vs_fit_best']:.2f}x"
              f"    input / ours: {r['input_vs_ours']:.1f}x",
              f"model: {r['params']:,} parameters, {r['train_flops_per_image'] / 1e6:.1f} MFLOP per training image "
              f"({r['flops_method']})",
              f"first training step done {r['first_step_s']:.1f} s after {r['first_step_from']}: {breakdown}",
              f"train_loop traced {r['train_loop_traces']} time(s) over all its calls",
              f"peak memory: {r['peak_rss_bytes'] / 2**20:.0f} MiB RSS (getrusage maxrss)"
              + (f", {r['peak_gpu_bytes'] / 2**20:.0f} MiB GPU" if r["peak_gpu_bytes"] is not None else "")]
    return "\n".join(lines)


def _config_from_flags():
    """The training configuration; the benchmark writes no run directory and trains a fixed number of steps, so
    --model_dir and the run length (which sets the learning-rate schedule's length) may be left out."""
    if FLAGS.model_dir is None:
        FLAGS.model_dir = "(unused by the benchmark)"
    if FLAGS.train_steps is None and FLAGS.train_epochs is None:
        FLAGS.train_epochs = 1
    return config_lib.config_from_flags()


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = _config_from_flags()
        if FLAGS.input_only:
            results = input_benchmark.measure(config, data.load(config), FLAGS.input_steps, FLAGS.benchmark_rounds)
        else:
            results = run(config, FLAGS.benchmark_steps, FLAGS.benchmark_warmup_steps, FLAGS.benchmark_rounds,
                          FLAGS.fit_steps_per_execution, FLAGS.input_steps)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = input_benchmark.format_results if FLAGS.input_only else format_table
    print(json.dumps(results, indent=1) if FLAGS.json else table(results))


if __name__ == "__main__":
    app.run(main)
