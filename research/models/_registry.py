"""The registry of model builders by name, which every model family fills (`@register("name", **capabilities)`) and
`create(config, dataset)` reads, with what each model supports. Apart from the families' package
(research/models/__init__.py imports them all), so that the families import it and it imports none of them.

A model declares its capabilities where it registers (timm's `create_model(drop_rate=..., drop_path_rate=...)`,
big_vision's `Model(**config.model)`), and everything that asks "does this model have X" reads them here: the
`only_if` of --dropout, --stochastic_depth and --sync_batchnorm, the --layer_decay and --trainable=head checks,
the flags' help, `python -m research.models --list`, and the tests' lists of families.

--pretrained (research/transfer.py) asks a hook rather than a yes or no: a family that can start from published
weights declares `pretrained=load`, a function `load(model, source, config) -> str` with this contract:
  - `model` is the family's model built for the run's data (every variable exists, --trainable already applied),
    not yet trained; `config` is the run's configuration;
  - `source` is what --pretrained names. A word (letters, digits, '_' and '-', such as `imagenet`) names weights
    the family knows how to find: `load` refuses a word it does not know with a UserError. Anything else is a file
    path, and `source` is then a local copy of that file: research/transfer.py has checked that it exists, copied
    a file on another filesystem (gs://, ram://) to a local temporary file of the same name, and records the
    file's SHA-256 in provenance.jsonl;
  - `load` assigns the weights to the model's variables (it never replaces layers or variables: checkpoints hold
    them by position), leaves the head (`classifier`) as the model made it unless the source has a head for the
    run's classes, and returns one line saying what it read, from where, and what it left fresh (printed when the
    run starts and recorded in provenance.jsonl);
  - a source that does not fit the model (another architecture, a damaged file, another format) is one UserError
    line, and the run does not start.
research/transfer.py calls it at a fresh start only, never on a resume (which continues from its own checkpoint).
"""

import dataclasses
import re

from research import UserError, config as config_lib


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a registered model supports. A bool field may also be a function config -> bool, for a capability that
    depends on the model's own flags (convnet has dropout layers only at a 'd' of --conv_layers)."""
    dropout: object = False  # Applies --dropout (else a --dropout given to it is warned of as ignored).
    stochastic_depth: object = False  # Drops residual branches at --stochastic_depth.
    batch_norm: object = False  # Has batch-norm layers, built with --sync_batchnorm.
    blocks: object = False  # Keeps its repeated blocks, in order, as `blocks` (--layer_decay gives each its rate).
    head: object = True  # Keeps its final classifier as `classifier` (research/transfer.py, --trainable=head).
    channels: tuple = None  # The image channels it accepts; None: any.
    pretrained: object = None  # Its --pretrained hook, load(model, source, config) -> str (the module docstring).

    def summary(self):
        """The capabilities in words, as --list shows them."""
        words = [name for name in ("dropout", "stochastic_depth", "batch_norm", "blocks", "head", "pretrained")
                 if getattr(self, name)]
        return " ".join(words + [f"channels={','.join(map(str, self.channels)) if self.channels else 'any'}"])


NAMED_WEIGHTS = re.compile(r"[A-Za-z0-9_-]+")  # --pretrained=WORD names weights a family knows; else a path.

_BUILDERS = {}  # Model name -> builder(config, dataset).
_CAPABILITIES = {}  # Model name -> Capabilities.


def register(name, **capabilities):
    """Decorator registering a builder as `name`, with its Capabilities (left out: none but a head, any channels)."""
    declared = Capabilities(**capabilities)

    def decorate(builder):
        _BUILDERS[name] = builder
        _CAPABILITIES[name] = declared
        return builder
    return decorate


def capabilities(name):
    return _CAPABILITIES[name]


def has(config, capability):
    """Whether `config.model` (in this configuration) has `capability`, a field of Capabilities; False for a name
    nobody registered (research.config's check of --model says so)."""
    value = getattr(_CAPABILITIES[config.model], capability) if config.model in _CAPABILITIES else None
    if capability == "pretrained":  # A hook, not a function of the configuration.
        return value is not None
    return bool(value(config) if callable(value) else value)


def having(capability):
    """The names of the models that declare `capability` (in some configuration, for a function)."""
    return [name for name in names() if getattr(_CAPABILITIES[name], capability)]


def names():
    return sorted(_BUILDERS)


def families():
    """{family: its first registered model}: a family is the module that registers its models (resnet for
    resnet_small and resnet18-152), in the order the families registered; what a test of every family trains."""
    first = {}
    for name, builder in _BUILDERS.items():
        first.setdefault(builder.__module__.rpartition(".")[2], name)
    return first


def describe(name):
    """The builder's one-line description (the first line of its docstring)."""
    doc = (_BUILDERS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create(config, dataset):
    """`config.model` built for `dataset` (anything with the research.data.Metadata fields); research.config has
    checked the name."""
    channels = _CAPABILITIES[config.model].channels
    if channels and dataset.image_shape[-1] not in channels:
        raise UserError(f"--model={config.model} takes images of {' or '.join(map(str, channels))} channels, not "
                        f"{dataset.image_shape[-1]}")
    return _BUILDERS[config.model](config, dataset)


@config_lib.checks
def _check_model(config):
    config_lib.need(config.model in _BUILDERS, f"--model={config.model} is unknown; choose from {', '.join(names())}")
