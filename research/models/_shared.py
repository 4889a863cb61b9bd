"""What several model families share: the flags they read alike (--dropout: each family says in its `register`
whether it applies it) and the stochastic-depth schedule. Defined once here, beside the families
(research/models/__init__.py imports every family, and the families import this)."""

from absl import flags

from research import config as config_lib
from research.config import CHECKPOINT, declare
from research.models._registry import applies_dropout

declare(CHECKPOINT, flags.DEFINE_float(
    "dropout", 0.0, "Dropout rate (0 = off): mlp, cnn_rgb and resnet_small apply it "
    "before the classifier, convnet at each 'd' of --conv_layers; cnn, resnet18-152 and vit_* have "
    "none (resnet* and vit_*: --stochastic_depth)."),
        only_if=applies_dropout, when="with a model that has dropout layers")
declare(CHECKPOINT, flags.DEFINE_boolean(
    "sync_batchnorm", False,
    "resnet* and convnet: batch-norm statistics over the global batch, all-reduced over the replicas at every "
    "batch-norm layer (Keras BatchNormalization(synchronized=True)), instead of over each replica's share; "
    "for large models at small per-replica batches. One replica: the same statistics either way."),
        only_if=lambda c: c.model.startswith("resnet") or c.model == "convnet", when="with --model=resnet* or convnet")
declare(CHECKPOINT, flags.DEFINE_float(
    "stochastic_depth", 0.0,
    "vit_* and resnet*: stochastic depth (0 = off): each residual branch (ViT: attention and MLP; ResNet: the "
    "block's convolutions) is dropped for whole examples, at a rate rising linearly from 0 at the first block "
    "to this at the last; seeded as dropout is."),
        only_if=lambda c: c.model.startswith(("vit_", "resnet")), when="with --model=vit_* or resnet*")


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 <= config.dropout < 1, "--dropout must be in [0, 1)")
    config_lib.need(0 <= config.stochastic_depth < 1,
                    f"--stochastic_depth must be in [0, 1), got {config.stochastic_depth}")


def drop_rates(rate, blocks):
    """Stochastic depth's drop rate of each of `blocks` residual blocks: rising linearly from 0 at the first to
    `rate` at the last (Huang et al. 2016; timm's and big_vision's schedule)."""
    return [rate * i / max(1, blocks - 1) for i in range(blocks)]
