"""The registry of model builders by name, which every model family fills (`@register("name")`) and
`create(config, dataset)` reads. Apart from the families' package (research/models/__init__.py imports them all), so
that the families import it and it imports none of them."""

from research import config as config_lib

_BUILDERS = {}
_APPLIES_DROPOUT = {}  # Model name -> config -> whether the model it builds has --dropout's layers.


def register(name, dropout=None):
    """Decorator registering a builder as `name`; `dropout`: config -> whether the model applies --dropout (left
    out: never, so that a --dropout given to it is warned of as ignored)."""
    def decorate(builder):
        _BUILDERS[name] = builder
        if dropout:
            _APPLIES_DROPOUT[name] = dropout
        return builder
    return decorate


def applies_dropout(config):
    return _APPLIES_DROPOUT.get(config.model, lambda config: False)(config)


def names():
    return sorted(_BUILDERS)


def describe(name):
    """The builder's one-line description (the first line of its docstring)."""
    doc = (_BUILDERS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create(config, dataset):
    """`config.model` built for `dataset` (anything with the research.data.Metadata fields); research.config has
    checked the name."""
    return _BUILDERS[config.model](config, dataset)


@config_lib.checks
def _check_model(config):
    config_lib.need(config.model in _BUILDERS, f"--model={config.model} is unknown; choose from {', '.join(names())}")
