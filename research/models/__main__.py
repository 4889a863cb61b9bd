"""`python -m research.models --model=NAME --image_size=S --num_classes=N [--channels=3] [model flags]`: the
model's trainable and total parameters and multiply-adds per image; `--list`: every model with one line each, its
description and its capabilities, at once (no model is built); `--list --params`: each line also with the model's
parameters at --image_size and --num_classes, which builds every model in turn (minutes on a CPU: the Keras
applications alone are 40 networks, the largest over 300 M parameters).

Sizes are what a paper's table compares, so this answers them without a dataset or a run: the model is built by
the registry exactly as training builds it (any model flag, e.g. --vit_pooling=gap, may follow), on a dataset
stand-in of that image shape and class count. Multiply-adds are half of TF's profiler count of the forward pass's
FLOPs (research.models.forward_flops, also the benchmark's), which adds the few batch-norm, activation and softmax
operations to the convolutions and matrix products.
"""

import sys

import tensorflow as tf
from absl import flags

from research import UserError, cli, config as config_lib, data, models


def main(argv=None):
    parser = cli.Parser(prog="python -m research.models", allow_abbrev=False,
                        description="Parameters and multiply-adds of a registered model.")
    parser.add_argument("--list", action="store_true",
                        help="name every model with one line each: its description and capabilities")
    parser.add_argument("--params", action="store_true",
                        help="with --list: also each model's parameters at --image_size, --num_classes (slow: "
                             "builds every model)")
    parser.add_argument("--model", help="a registered model name")
    parser.add_argument("--image_size", type=int, default=224, help="square input images of this side (224)")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of the head (1000)")
    parser.add_argument("--channels", type=int, default=3, help="image channels (3)")
    args, model_flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in ("image_size", "num_classes", "channels"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    try:
        unexpected = flags.FLAGS(["research.models", *model_flags])[1:]
    except flags.Error as e:
        raise UserError(str(e)) from None
    if unexpected:
        raise UserError(f"unexpected arguments: {' '.join(unexpected)}")
    if args.list:
        width = max(map(len, models.names()))
        for name in models.names():
            params = f" {_parameters(name, args):>13}" if args.params else ""
            print(f"{name:{width}}{params} {models.describe(name)} [{models.capabilities(name).summary()}]")
        return 0
    if args.params:
        raise UserError("--params goes with --list (a --model's parameters are printed anyway)")
    if not args.model:
        raise UserError("--model is required (or --list)")
    config, shape = _config(args.model), (args.image_size, args.image_size, args.channels)
    model = _built(config, args)
    trainable = sum(int(tf.size(v)) for v in model.trainable_variables)
    flops = models.forward_flops(model, shape)
    print(f"{args.model} on {args.image_size}x{args.image_size}x{args.channels} images, {args.num_classes} classes")
    print(f"  trainable parameters  {trainable:,}")
    print(f"  total parameters      {int(model.count_params()):,}")
    print(f"  multiply-adds         {flops / 2 / 1e9:.3f} G per image ({flops / 1e9:.3f} GFLOPs forward)")
    return 0


def _config(name):
    return config_lib.make_config(**{f.name: f.value for f in config_lib.run_flags() if f.present}, model=name,
                                  model_dir="unused", train_steps=1)


def _built(config, args):
    """`config.model` built as training builds it, for the command's image shape and class count."""
    shape = (args.image_size, args.image_size, args.channels)
    model = models.create(config, data.Metadata("--image_size", shape, [str(i) for i in range(args.num_classes)]))
    try:
        model(tf.zeros([1, *shape]))
    except (ValueError, tf.errors.OpError) as e:  # E.g. valid convolutions and pools that shrink it below nothing.
        raise UserError(f"--model={config.model} does not fit {shape} images: {cli.keras_error_line(e)}") from None
    return model


def _parameters(name, args):
    """The model's parameters for --list --params, or why it has none at this size."""
    try:
        return f"{int(_built(_config(name), args).count_params()):,}"
    except UserError:
        return "does not fit"
    finally:
        tf.keras.backend.clear_session()  # Each model once: what Keras keeps of them would add up over the list.


if __name__ == "__main__":
    sys.exit(cli.run(main))
