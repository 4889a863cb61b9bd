"""Models, looked up by name: `create(config, dataset)` builds `--model`.

Each module in this package registers its builders with `@register("name")`; a builder takes the run config and
the `research.data.Dataset` (image shape, number of classes) and returns a subclassed `tf.keras.Model` whose call
returns logits. Every module here is imported on first use, so adding a model touches only its own file.
"""

import importlib
import pkgutil

from research import UserError

_BUILDERS = {}


def register(name):
    def decorate(builder):
        _BUILDERS[name] = builder
        return builder
    return decorate


def names():
    _import_all()
    return sorted(_BUILDERS)


def create(config, dataset):
    _import_all()
    if config.model not in _BUILDERS:
        raise UserError(f"--model={config.model} is unknown; choose from {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[config.model](config, dataset)


def _import_all():
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
