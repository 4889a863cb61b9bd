"""What several model families share: the flags that each family says in its `register` whether it applies
(--dropout, --stochastic_depth, --sync_batchnorm through its batch norm: research/models/_registry.py Capabilities)
and the stochastic-depth schedule. Defined once here, beside the families (research/models/__init__.py imports every
family, and the families import this)."""

from absl import flags

from research import config as config_lib
from research.config import CHECKPOINT, declare
from research.models import _registry

# Flag -> (the capability a model declares to apply it, in words).
CAPABILITY_OF_FLAG = {"dropout": ("dropout", "dropout layers"), "sync_batchnorm": ("batch_norm", "batch norm"),
                      "stochastic_depth": ("stochastic_depth", "residual branches to drop")}


def _declare(holder):
    capability, words = CAPABILITY_OF_FLAG[holder.name]
    declare(CHECKPOINT, holder, only_if=lambda config: _registry.has(config, capability),
            when=f"with a model that has {words}")


_declare(flags.DEFINE_float(
    "dropout", 0.0, "Dropout rate (0 = off), where the model has dropout layers (its family's docstring says where)."))
_declare(flags.DEFINE_boolean(
    "sync_batchnorm", False,
    "Batch-norm statistics over the global batch, all-reduced over the replicas at every batch-norm layer (Keras "
    "BatchNormalization(synchronized=True)), instead of over each replica's share; for large models at small "
    "per-replica batches. One replica: the same statistics either way."))
_declare(flags.DEFINE_float(
    "stochastic_depth", 0.0,
    "Stochastic depth (0 = off): each residual branch (ViT: attention and MLP; ResNet: the block's convolutions) is "
    "dropped for whole examples, at a rate rising linearly from 0 at the first block to this at the last; seeded "
    "as dropout is."))


def name_the_models_in_help():
    """Ends each flag's help with the models that declare its capability; called once every family registered."""
    for flag, (capability, _) in CAPABILITY_OF_FLAG.items():
        flags.FLAGS[flag].help += f" Models that have it: {', '.join(_registry.having(capability))}."


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 <= config.dropout < 1, "--dropout must be in [0, 1)")
    config_lib.need(0 <= config.stochastic_depth < 1,
                    f"--stochastic_depth must be in [0, 1), got {config.stochastic_depth}")


def drop_rates(rate, blocks):
    """Stochastic depth's drop rate of each of `blocks` residual blocks: rising linearly from 0 at the first to
    `rate` at the last (Huang et al. 2016; timm's and big_vision's schedule)."""
    return [rate * i / max(1, blocks - 1) for i in range(blocks)]
