"""--pretrained for the keras/ models (research/models/keras_apps.py): the hook `load` of the registry's contract
(research/models/_registry.py), reading weights the way keras.applications itself reads them.

Keras reads them: `keras.applications.<Name>(weights=SOURCE, include_top=...)` builds the application and loads
`imagenet` (its ImageNet file, fetched once into Keras' cache, ~/.keras/models/, and checked against the hash Keras
pins) or a weights file (`save_weights`' .weights.h5, or Keras' older .h5 such as the ImageNet files themselves);
Keras refuses a file of another architecture or format. The weights are then copied, layer by layer in Keras'
order, into the model's own network (the same layers, built by the same function: ConvNeXt's drop-path layers
and synchronized batch norm hold no other weights). So the model computes, on images in [0, 1], exactly what the
application computes on `preprocess_input(images * 255)`.

The head: the ImageNet top of most applications is global average pooling and one Dense layer (MobileNet's a 1x1
convolution), which is this model's head: a run of 1000 classes keeps it (its outputs are ImageNet's classes, in
Keras' order, until training relabels them), read from a file with a top (Keras' `imagenet` with its top, or a
weights file saved with `include_top=True`), unless --init_skip=head. Otherwise the head stays at zero, as the
model made it: another number of classes, a file without a top, or a top that is more than one Dense layer on the
pooled features (VGG's three, MobileNetV3's extra convolution, ConvNeXt's layer norm), whose extra layers this model
does not have.

Offline, a missing ImageNet file is found before Keras tries to fetch it (a short probe of its URL, not Keras'
retries), and the error line names the URL to fetch and where to put the file, or to pass its path instead.
"""

import contextlib
import os
import threading
import urllib.request
import warnings
from unittest import mock

import keras
import numpy as np
from keras.src.backend import config as keras_config
from keras.src.utils import file_utils

from research import UserError, fs

PROBE_TIMEOUT_S = 10  # How long the probe of a weights URL waits for an answer before calling the machine offline.
IMAGENET = "imagenet"


def load(model, source, config, architecture):
    """Reads `source` (`imagenet` or a local weights file) into `model`, a keras_apps.KerasApplication of
    `architecture` (its row of keras_apps.ARCHITECTURES); returns what it did."""
    application, head = model.application, architecture.head
    if source != IMAGENET and not os.path.isfile(source):  # A word this family does not know (paths are checked).
        raise UserError(f"--pretrained={source}: keras/{application} takes `imagenet` (Keras' ImageNet weights) or "
                        "the path of a Keras weights file (.weights.h5 or .h5)")
    shape = tuple(model.backbone.input_shape[1:])
    wants_head = head is not None and model.num_classes == 1000 and config.init_skip != "head"
    fetched = []
    with _fetching_checked(config.pretrained, fetched), warnings.catch_warnings(), _float32():
        warnings.simplefilter("ignore")  # Keras' loader warns per layer about what it then loads or refuses.
        reference = _with_top(application, source, shape, config.pretrained) if wants_head else None
        with_top = reference is not None
        if not with_top:
            reference = _built(application, source, shape, False, config.pretrained)
    ours = [layer for layer in model.backbone.layers if layer.weights]
    theirs = [layer for layer in reference.layers if layer.weights]  # The network's, then the top's.
    misfit = next((f"{a.name} {[tuple(w.shape) for w in a.weights]} vs {b.name} {[tuple(w.shape) for w in b.weights]}"
                   for a, b in zip(ours, theirs) if [w.shape for w in a.weights] != [w.shape for w in b.weights]),
                  None if len(theirs) >= len(ours) else f"{len(theirs)} layers of weights, not {len(ours)}")
    if misfit:  # The same function built both: only a change of Keras could part them.
        raise UserError(f"--pretrained={config.pretrained}: keras.applications.{application}'s layers do not line up "
                        f"with keras/{application}'s ({misfit})")
    for a, b in zip(ours, theirs):
        for target, value in zip(a.weights, b.weights):
            target.assign(value.numpy())
    if source == IMAGENET and architecture.imagenet_differs:
        architecture.imagenet_differs(model.backbone)
    if with_top:
        kernel, bias = reference.get_layer(head).weights
        model.classifier.kernel.assign(np.reshape(kernel.numpy(), [-1, 1000]))
        model.classifier.bias.assign(bias.numpy())
    _check_computes_as(reference, model, with_top, config.pretrained)
    where = (f"Keras' ImageNet weights {fetched[-1]} (sha256 {fs.sha256(fetched[-1])})" if source == IMAGENET
             else config.pretrained)
    note = f"Initialised keras/{application} from {where}: its network"
    if with_top:
        return note + (" and its ImageNet head (1000 classes: ImageNet's, in Keras' order, until training relabels "
                       "them)")
    reason = (f"keras.applications.{application}'s top is more than a Dense layer on pooled features" if not head
              else f"the run has {model.num_classes} classes, not ImageNet's 1000" if model.num_classes != 1000
              else "--init_skip=head" if not wants_head else "the file holds no top")
    return note + f"; the head starts at zero ({reason})"


def _check_computes_as(reference, model, with_top, shown):
    """That the model now computes what the application computes, on one random image at the run's size: a change
    of Keras that built the application otherwise for its weights (as EfficientNet's ImageNet rescaling) is an
    error, not a network silently other than the weights'. (Not where Keras built the ImageNet top at its own
    size, which the model cannot take; a model built in 16 bits is compared at 16 bits' precision.)"""
    if tuple(reference.input_shape[1:]) != tuple(model.backbone.input_shape[1:]):
        return
    preprocess = getattr(keras.applications, model.architecture.module).preprocess_input
    inputs = preprocess(np.random.default_rng(0).uniform(0, 255, (1, *reference.input_shape[1:])).astype("float32"))
    features = model.pool(model.backbone(inputs, training=False))
    ours = (model.classifier(features) if with_top else features).numpy().astype("float32")
    theirs = reference(inputs, training=False).numpy()
    theirs = theirs if with_top else theirs.mean(axis=(1, 2))
    error = float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12))
    if error > (1e-2 if model.compute_dtype == "float32" else 1e-1):  # Rounding, through a deep network: far less.
        raise UserError(f"--pretrained={shown}: keras/{model.application} does not compute what "
                        f"keras.applications.{model.application} computes with these weights (relative difference "
                        f"{error:.2g} on a random image): this Keras builds it otherwise")


class Refused(UserError):
    """Keras (or h5py) cannot load the weights into the application."""


def _built(application, weights, shape, include_top, shown):
    """keras.applications.<application> with `weights` loaded by Keras; a refusal is one line (Refused)."""
    top = dict(include_top=True, classifier_activation=None) if include_top else dict(include_top=False)
    try:
        return getattr(keras.applications, application)(weights=weights, input_shape=shape, **top)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Keras and h5py refuse a file with ValueError, OSError, KeyError, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise Refused(f"--pretrained={shown}: keras.applications.{application}(include_top={include_top}) cannot "
                      f"load it: {reason}") from None


def _with_top(application, weights, shape, shown):
    """The application with its ImageNet top, if `weights` has one (else None): at the run's image size, or at
    Keras' own where it allows no other for its ImageNet top (the top's weights do not depend on the size)."""
    for size in (shape, None):
        try:
            return _built(application, weights, size, True, shown)
        except Refused as e:
            if "input_shape" not in str(e) or weights != IMAGENET:
                return None  # A file without a top (or none at all: the load without a top says why).
    return None


@contextlib.contextmanager
def _float32():
    """Keras builds the application's layers under the global policy, which a training run may have set."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def _fetching_checked(shown, fetched):
    """Keras' fetch of a weights file (file_utils.get_file, which every application calls), made to fail in one
    line where it cannot succeed, before it tries: a file missing from the cache on a machine that cannot reach its
    URL, or a cached file that is not the one Keras pins (Keras would fetch it again, deleting it if that fails).
    Appends each path it gives to `fetched`."""
    fetch = file_utils.get_file

    def get_file(fname=None, origin=None, file_hash=None, cache_subdir="datasets", cache_dir=None, **kwargs):
        path = os.path.join(cache_directory(cache_dir), cache_subdir, fname or os.path.basename(origin))
        if os.path.exists(path) and file_hash and not file_utils.validate_file(path, file_hash):
            raise UserError(f"--pretrained={shown}: {path} is not the file Keras expects (its hash is not "
                            f"{file_hash}): fetch {origin} again and put it there, or remove it")
        if not os.path.exists(path) and not reachable(origin):
            raise UserError(f"--pretrained={shown} needs {os.path.basename(path)}, which this machine cannot fetch "
                            f"(no answer from {origin}): fetch that URL on a machine with internet and put the file "
                            f"at {path}, where Keras looks for it, or pass its path as --pretrained=PATH")
        fetched.append(fetch(fname, origin, file_hash=file_hash, cache_subdir=cache_subdir, cache_dir=cache_dir,
                             **kwargs))
        return fetched[-1]

    with mock.patch.object(file_utils, "get_file", get_file):
        yield


def cache_directory(cache_dir=None):
    """Where Keras keeps fetched files (file_utils.get_file's rule): $KERAS_HOME or ~/.keras, or /tmp/.keras where
    that cannot be written."""
    base = os.path.expanduser(cache_dir or keras_config.keras_home())
    return base if os.access(base, os.W_OK) else os.path.join("/tmp", ".keras")


def reachable(url, timeout=PROBE_TIMEOUT_S):
    """Whether `url`'s server answers within `timeout` seconds (any HTTP status counts): a HEAD request, as Keras'
    download would go (through the environment's proxy, if any), in a thread, so that a resolver that retries for
    minutes is not waited for."""
    answered = []

    def probe():
        try:
            opener = urllib.request.build_opener()  # (Reads the proxy settings now, as urlopen's did once.)
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:  # noqa: BLE001 - URLError, socket timeouts, resolver failures: no answer.
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answered and answered[0])
