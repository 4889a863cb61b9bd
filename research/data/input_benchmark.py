"""How fast the input pipeline alone is (`python -m research.benchmark --input_only ...` prints it), and synthetic
image folders to measure it on (`python -m research.data.input_benchmark PATH --files=N [--size=500x375]`).

Why a bare loop beside it: the decoding itself (JPEG decode, crop, resize) is the floor of any pipeline's cost;
what our pipeline adds on top (the permutation by index, per-step reads, seeds, unbatching, the other ops) is the
gap between the two, measured in the same process on the same files with the same threads. Each is measured with
tf.data's private thread pool of 1 thread and of every core, so images/s per core and the scaling show.
"""

import os
import resource
import sys
import time

import numpy as np
import psutil
import tensorflow as tf

from research import UserError, cli, data
from research.data import preprocess, sources


def measure(config, dataset, batches, rounds=3):
    """{threads: {"pipeline": images/s, "bare": images/s, "ratio"}} for 1 thread and every core (each the best of
    `rounds` rounds in which the two take turns: on a shared machine the least-disturbed round is the closest to
    each one's own speed), plus memory and timings."""
    cores = os.cpu_count()
    started = time.time()
    results = {"threads": {}}
    for threads in sorted({1, cores}):
        pipelines = {"pipeline": data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())}
        if isinstance(dataset.train, sources.FileSource):
            pipelines["bare"] = _bare(dataset, config)
        pipelines = {name: ds.with_options(_threads(threads)) for name, ds in pipelines.items()}
        first = time.time()
        next(iter(pipelines["pipeline"]))
        results.setdefault("first_batch_s", time.time() - first)
        samples = {name: [] for name in pipelines}
        for _ in range(rounds):
            for name, ds in pipelines.items():
                samples[name].append(_images_per_sec(ds, batches, config.batch_size))
        rates = {name: max(wall for wall, _ in values) for name, values in samples.items()}
        rates.update({f"{name}_per_cpu_s": max(cpu for _, cpu in values) for name, values in samples.items()})
        rates["rounds"] = samples
        if "bare" in rates:
            rates["ratio"] = rates["pipeline"] / rates["bare"]
            rates["ratio_per_cpu_s"] = rates["pipeline_per_cpu_s"] / rates["bare_per_cpu_s"]
        results["threads"][threads] = rates
    results.update(
        dataset=dataset.name, examples=dataset.num_train, reading=dataset.reading, batch_size=config.batch_size,
        image_size=dataset.image_shape, augment=config.augment, cores=cores, batches=batches, rounds=rounds,
        measure_s=time.time() - started, first_batch_from_start_s=started + results["first_batch_s"] -
        psutil.Process().create_time(),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, load_average=os.getloadavg())
    return results


def format_results(r):
    lines = [f"input pipeline alone: {r['dataset']} ({r['examples']} examples, {r['reading']}), batch "
             f"{r['batch_size']}, model input {r['image_size']}, --augment={','.join(r['augment']) or 'none'}; "
             f"best of {r['rounds']} rounds of {r['batches']} batches; load average {', '.join(f'{x:.1f}' for x in r['load_average'])}",
             f"{'threads':>8} {'pipeline img/s':>15} {'per thread':>11} {'bare img/s':>11} {'ratio':>6}"
             f" {'pipeline img/CPU-s':>19} {'bare img/CPU-s':>15} {'ratio':>6}"]
    for threads, rates in r["threads"].items():
        line = f"{threads:>8} {rates['pipeline']:15.0f} {rates['pipeline'] / threads:11.0f}"
        if "bare" in rates:
            line += (f" {rates['bare']:11.0f} {rates['ratio']:6.2f} {rates['pipeline_per_cpu_s']:19.0f}"
                     f" {rates['bare_per_cpu_s']:15.0f} {rates['ratio_per_cpu_s']:6.2f}")
        else:
            line += f" {'-':>11} {'-':>6} {rates['pipeline_per_cpu_s']:19.0f}"
        lines.append(line)
    lines += ["bare: read_file, the same crop sampling, decode_and_crop_jpeg (JPEG) or decode + crop, bilinear "
              "resize, batch; same files and threads. img/CPU-s: images per second of this process's CPU time, "
              "what one core's work costs even where other processes share the cores (wall rates then vary)",
              f"first batch {r['first_batch_s']:.2f} s after building the pipeline, "
              f"{r['first_batch_from_start_s']:.1f} s after process start",
              f"peak memory: {r['peak_rss_bytes'] / 2**20:.0f} MiB RSS (getrusage maxrss)"]
    return "\n".join(lines)


def _threads(threads):
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


def _images_per_sec(ds, batches, batch_size):
    """(images per wall second, images per CPU second of this process)."""
    count = lambda n: ds.take(n).reduce(tf.constant(0, tf.int64), lambda c, _: c + 1).numpy()  # noqa: E731
    count(max(1, batches // 10))  # Warm-up: threads started, autotuning settled.
    wall, cpu = time.perf_counter(), time.process_time()
    count(batches)
    images = batches * batch_size
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def _bare(dataset, config):
    """Decoding alone: each file read, cropped as random_resized_crop crops (fused for JPEG), resized, batched."""
    source, prep = dataset.train, dataset.preprocessing
    scale, ratio = tuple(config.crop_scale), tuple(config.crop_ratio)
    paths = tf.constant([source.name_of(i) for i in range(len(source))])

    def decode(index):
        encoded = tf.io.read_file(paths[index])
        return preprocess.random_resized_crop(encoded, True, prep.image_size, prep.channels, scale, ratio,
                                              tf.stack([index, index]))

    ds = tf.data.Dataset.range(len(source)).repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def write_folder(root, files, size=(500, 375), quality=90, seed=0, classes=10):
    """`files` synthetic photos: smooth colour fields with edges, JPEG at `quality` (~60 KB at 500x375, like
    photos, where random noise would be several times larger and slower to decode), over `classes` class
    folders of root/train. With size (8, 8): tiny PNGs, all the same bytes, for start-up and memory at scale."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    width, height = size
    tiny = width * height <= 256
    if tiny:
        encoded = tf.io.encode_png(tf.zeros([height, width, 3], tf.uint8)).numpy()
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"class{c:03d}"), exist_ok=True)
    for i in range(files):
        path = os.path.join(root, "train", f"class{i % classes:03d}", f"{i:07d}.{'png' if tiny else 'jpg'}")
        if tiny:
            with open(path, "wb") as f:
                f.write(encoded)
            continue
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.float32) + rng.normal(0, 12, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)


def _main(argv):
    parser = cli.Parser(prog="python -m research.data.input_benchmark",
                        description="Write a synthetic image folder to benchmark input on.")
    parser.add_argument("root", help="A new (or empty) folder: the images go to ROOT/train/class000/...")
    parser.add_argument("--files", type=int, default=2000, help="How many images.")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT; 8x8 writes tiny identical PNGs.")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.split("x"))
    except ValueError:
        raise UserError(f"--size={args.size}: expected WIDTHxHEIGHT") from None
    if width < 1 or height < 1 or width * height > preprocess.MAX_IMAGE_PIXELS:
        raise UserError(f"--size={args.size}: expected positive sizes of at most {preprocess.MAX_IMAGE_PIXELS} "
                        "pixels in all")
    if args.files < 1:
        raise UserError(f"--files must be positive, got {args.files}")
    # Never into a folder that holds anything: it may be a real dataset, which synthetic classes would join.
    if os.path.exists(args.root) and not (os.path.isdir(args.root) and not os.listdir(args.root)):
        raise UserError(f"{args.root} already exists and is not an empty folder: give a new one")
    started = time.time()
    try:
        write_folder(args.root, args.files, (width, height))
    except OSError as e:
        raise UserError(f"cannot write {args.root}: {e.strerror}") from None
    print(f"wrote {args.files} images to {args.root}/train in {time.time() - started:.0f} s")


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
