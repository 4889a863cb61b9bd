"""What a contributor adds, each in one place: a model family file (with batch norm, stochastic depth and blocks),
an optimizer entry and an augmentation op, trained together through the real loop; --sync_batchnorm,
--stochastic_depth and --layer_decay then apply to the new family with no other edit."""

import importlib.util
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from research import UserError, augment, config as config_lib, data, models, optim, trainer
from research.augment import _registry as augment_registry
from research.models import _registry as model_registry

FAMILY = '''
    """A new family: a stem and two residual blocks of convolution and batch norm, their branches dropped at
    --stochastic_depth; all it declares is in its register()."""

    import tensorflow as tf

    from research.models._registry import register
    from research.models._shared import drop_rates

    layers = tf.keras.layers


    class Block(layers.Layer):
        def __init__(self, width, sync_batchnorm, drop_rate, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(width, 3, padding="same", use_bias=False)
            self.norm = layers.BatchNormalization(synchronized=sync_batchnorm)
            self.drop = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1)) if drop_rate else None

        def call(self, x, training=False):
            y = tf.nn.relu(self.norm(self.conv(x), training=training))
            return x + (y if self.drop is None else self.drop(y, training=training))


    class TinyResNet(tf.keras.Model):
        def __init__(self, num_classes, sync_batchnorm, stochastic_depth, **kwargs):
            super().__init__(**kwargs)
            self.num_classes = num_classes
            self.stem = layers.Conv2D(8, 3, strides=2, padding="same")
            self.blocks = [Block(8, sync_batchnorm, rate) for rate in drop_rates(stochastic_depth, 2)]
            self.pool = layers.GlobalAveragePooling2D()
            self.classifier = layers.Dense(num_classes, dtype="float32")

        def call(self, images, training=False):
            x = self.stem(images)
            for block in self.blocks:
                x = block(x, training=training)
            return self.classifier(self.pool(x))


    @register("tiny_resnet", batch_norm=True, stochastic_depth=True, blocks=True)
    def tiny_resnet(config, dataset):
        """Two residual blocks with batch norm (tests/test_extension.py)."""
        return TinyResNet(dataset.num_classes, config.sync_batchnorm, config.stochastic_depth, name="tiny_resnet")
'''


@pytest.fixture
def extended(tmp_path, monkeypatch):
    """The three additions, each made in one place and undone afterwards: the family as a file of its own, imported
    as research/models/__init__.py imports a family; an entry in optim.OPTIMIZERS; an op registered with
    research.augment (a new seed stream)."""
    monkeypatch.setattr(model_registry, "_BUILDERS", dict(model_registry._BUILDERS))
    monkeypatch.setattr(model_registry, "_CAPABILITIES", dict(model_registry._CAPABILITIES))
    monkeypatch.setattr(augment_registry, "_OPS", dict(augment_registry._OPS))
    (tmp_path / "tiny_resnet.py").write_text(textwrap.dedent(FAMILY))
    spec = importlib.util.spec_from_file_location("research.models.tiny_resnet", tmp_path / "tiny_resnet.py")
    monkeypatch.setitem(sys.modules, spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules[spec.name])

    monkeypatch.setitem(optim.OPTIMIZERS, "adagrad", optim.Optimizer(tf.keras.optimizers.Adagrad))

    @augment.register("darken", stream=max(op.stream for op in augment.ops()) + 1, stage="policy")
    def darken(image, seed, config):
        return image * tf.random.stateless_uniform([], seed, 0.5, 1.0)


def test_a_new_family_optimizer_and_op_train_and_the_shared_flags_apply(extended, mock_tfds, tmp_path):
    flags = dict(model="tiny_resnet", optimizer="adagrad", augment="darken,flip", sync_batchnorm=True,
                 stochastic_depth="0.3", layer_decay="0.8", strategy="mirrored", batch_size=8, train_steps=2,
                 steps_per_loop=1, eval_every=2)
    config = config_lib.make_config(model_dir=str(tmp_path / "run"), **flags)
    assert config_lib.ignored(config) == []  # No "ignored" warning: every flag applies to the new family.
    results = trainer.train_and_evaluate(config)
    assert results["step"] == 2 and np.isfinite(results["train"]["loss"]) and results["model"] == "tiny_resnet"

    model = models.create(config, data.Metadata("mnist", (28, 28, 1), [str(i) for i in range(10)]))
    model(tf.zeros([1, 28, 28, 1]))
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, tf.keras.layers.BatchNormalization)]
    assert norms and all(norm.synchronized for norm in norms)
    assert [0.0 if block.drop is None else block.drop.rate for block in model.blocks] == [0.0, 0.3]
    assert "tiny_resnet" in models.having("batch_norm") and "tiny_resnet" in models.families().values()

    # The XLA check sees the new family's batch norm as it sees resnet's and convnet's.
    with pytest.raises(UserError, match="--sync_batchnorm with --jit_compile needs GPU replicas"):
        trainer.train_and_evaluate(config_lib.make_config(model_dir=str(tmp_path / "jit"), **flags, jit_compile=True))
