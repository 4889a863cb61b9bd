"""Models, looked up by name: `create(config, dataset)` builds `--model`.

Each module in this package registers its builders with `@register("name")`; a builder takes the run config and
the `research.data.Dataset` (image shape, number of classes) and returns a subclassed `tf.keras.Model` whose call
returns logits. Every module here is imported with the package, so adding a model touches only its own file.
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
    return sorted(_BUILDERS)


def create(config, dataset):
    if config.model not in _BUILDERS:
        raise UserError(f"--model={config.model} is unknown; choose from {', '.join(names())}")
    return _BUILDERS[config.model](config, dataset)


# Import every model module now, so that their builders are registered and their Keras classes are known to
# `keras.saving.load_model` as soon as research.models is imported.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
