"""The registry of augmentation ops by name, which every op module of research/augment/ fills and the package's
`apply` reads. Apart from the package (its __init__ imports every op module), so that the op modules import it and
it imports none of them."""

import dataclasses

STAGES = ("geometry", "policy", "occlusion")


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    function: object  # (image, seed, config) -> image; an `affine` op's: (seed, config) -> its share of the warp.
    stream: int  # Which of the example's seeds is its own, for good.
    stage: str  # One of STAGES: when it applies.
    affine: bool = False  # Returns {"angle"|"zoom"|"shift": tensor}: one resampling of them all (augment._warp).
    probability: str = None  # The flag of the probability that it changes an image; None: it always does.


_OPS = {}  # Name -> Op.
_DECODING = {}  # Name -> (payload, encoded, preprocessing, config, seed) -> float image: the op made while decoding.


def register(name, stream, stage, affine=False, probability=None):
    """Decorator registering an op function under `name` (see Op)."""
    if stage not in STAGES or any(op.stream == stream for op in _OPS.values()):
        raise ValueError(f"augmentation {name}: stage must be one of {STAGES}, stream {stream} a new one")

    def decorate(function):
        _OPS[name] = Op(name, function, stream, stage, affine, probability)
        return function
    return decorate


def register_decoding(name):
    """Decorator registering the op made while decoding (it replaces the decode and resize of a training image)."""
    def decorate(function):
        _DECODING[name] = function
        return function
    return decorate


def names():
    return sorted([*_OPS, *_DECODING])


def ops():
    """The registered ops in the order they apply: by stage, then in the order they registered (modules in
    alphabetical order, each op in the order of its module)."""
    return sorted(_OPS.values(), key=lambda op: STAGES.index(op.stage))


def only_with(name):
    """The `declare` arguments of a flag that an op reads: it has an effect only with that op in --augment."""
    return dict(only_if=lambda config: name in config.augment, when=f"with --augment={name}")


def decoding(config):
    """The op made while decoding that --augment names, or None: (payload, encoded, preprocessing, config, seed)."""
    return next((_DECODING[name] for name in config.augment if name in _DECODING), None)
