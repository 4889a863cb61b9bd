"""Public ViT weights (big_vision / AugReg .npz files) into vit_* models, checked against an independent NumPy forward
pass of the same file; and --init_checkpoint from a vit_* run at another image size (position embeddings resampled).

The files are random, in the files' own layout and names, at the size of vit_ti16 two blocks deep."""

import io
import math
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, models, trainer
from research.data.preprocess import NORMALIZATIONS
from research.models import _vit_npz
from test_finetune import latest_values

WIDTH, HEADS, DEPTH, PATCH, CLASSES = 192, 3, 2, 16, 10  # vit_ti16 under the shallow_models fixture.
BLOCK = {"AugReg": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
         "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")}


def vit_file(seed, grid, naming="AugReg", token=True, prefix="", classes=CLASSES, width=WIDTH, heads=HEADS,
             depth=DEPTH, patch=PATCH):
    """{key: array} of a random ViT as big_vision saves it: made for a `grid` (height, width) of patches."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.1):
        return rng.normal(0, std, shape).astype(np.float32)

    attention, mlp_norm, mlp = BLOCK[naming]
    w = {"embedding/kernel": normal(patch, patch, 3, width, std=patch ** -1),
         "embedding/bias": normal(width), "Transformer/encoder_norm/scale": 1 + normal(width),
         "Transformer/encoder_norm/bias": normal(width), "head/kernel": normal(width, classes, std=width ** -0.5),
         "head/bias": normal(classes)}
    patches = grid[0] * grid[1]
    if naming == "AugReg":  # Added after the class token is put in front: its row first.
        w["Transformer/posembed_input/pos_embedding"] = normal(1, token + patches, width, std=0.5)
    else:
        w["pos_embedding"] = normal(1, patches, width, std=0.5)
    if token:
        w["cls"] = normal(1, 1, width, std=0.5)
    for i in range(depth):
        at = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", mlp_norm):
            w[f"{at}{norm}/scale"], w[f"{at}{norm}/bias"] = 1 + normal(width), normal(width)
        for name in ("query", "key", "value"):
            w[f"{at}{attention}/{name}/kernel"] = normal(width, heads, width // heads, std=width ** -0.5)
            w[f"{at}{attention}/{name}/bias"] = normal(heads, width // heads)
        w[f"{at}{attention}/out/kernel"] = normal(heads, width // heads, width, std=width ** -0.5)
        w[f"{at}{attention}/out/bias"] = normal(width)
        for j, (fan_in, fan_out) in enumerate(((width, 4 * width), (4 * width, width))):
            w[f"{at}{mlp}/Dense_{j}/kernel"] = normal(fan_in, fan_out, std=fan_in ** -0.5)
            w[f"{at}{mlp}/Dense_{j}/bias"] = normal(fan_out)
    return {prefix + key: value for key, value in w.items()}


def save(arrays, path):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def reference_logits(w, pixels, naming, prefix=""):
    """The file's ViT on `pixels` in [0, 1] ([batch, H, W, 3]), in float64 NumPy, as big_vision runs it: pixels to
    [-1, 1], patches embedded by a matrix product, position embeddings resized bilinearly with aligned corners (TF's
    own kernel here, not the one under test) to the image's grid, pre-LayerNorm blocks of multi-head attention and
    an exact-GELU MLP, a final LayerNorm, the head on the class token or on the mean of the tokens."""
    w = {key[len(prefix):]: value.astype(np.float64) for key, value in w.items()}
    attention, mlp_norm, mlp = BLOCK[naming]
    batch, height, width_px, _ = pixels.shape
    grid = (height // PATCH, width_px // PATCH)
    x = (2 * pixels.astype(np.float64) - 1).reshape(batch, grid[0], PATCH, grid[1], PATCH, 3)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid[0] * grid[1], -1)
    x = x @ w["embedding/kernel"].reshape(-1, WIDTH) + w["embedding/bias"]
    position = w["Transformer/posembed_input/pos_embedding" if naming == "AugReg" else "pos_embedding"]
    token = "cls" in w
    own = token and naming == "AugReg"  # The class token's row is in the file's position embeddings.
    side = math.isqrt(position.shape[1] - own)
    resized = tf.raw_ops.ResizeBilinear(images=position[:, own:].reshape(1, side, side, -1), size=grid,
                                        align_corners=True).numpy().reshape(1, -1, WIDTH)
    if own:
        x = np.concatenate([np.tile(w["cls"], [batch, 1, 1]), x], axis=1) + np.concatenate(
            [position[:, :1], resized], axis=1)
    else:
        x = x + resized
        x = np.concatenate([np.tile(w["cls"], [batch, 1, 1]), x], axis=1) if token else x

    def norm(x, at):
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6) * w[f"{at}/scale"] + w[f"{at}/bias"]

    erf = np.vectorize(math.erf)
    for i in range(DEPTH):
        at = f"Transformer/encoderblock_{i}/"
        y = norm(x, f"{at}LayerNorm_0")
        q, k, v = (np.einsum("bnd,dhk->bhnk", y, w[f"{at}{attention}/{n}/kernel"])
                   + w[f"{at}{attention}/{n}/bias"][None, :, None] for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(WIDTH // HEADS)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("bhnk,hkd->bnd", weights @ v, w[f"{at}{attention}/out/kernel"]) + w[
            f"{at}{attention}/out/bias"]
        y = norm(x, f"{at}{mlp_norm}") @ w[f"{at}{mlp}/Dense_0/kernel"] + w[f"{at}{mlp}/Dense_0/bias"]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        x = x + y @ w[f"{at}{mlp}/Dense_1/kernel"] + w[f"{at}{mlp}/Dense_1/bias"]
    x = norm(x, "Transformer/encoder_norm")
    return (x[:, 0] if token else x.mean(1)) @ w["head/kernel"] + w["head/bias"]


def built(image_shape=(32, 32, 3), classes=CLASSES, **flags):
    config = make_config("unused", model="vit_ti16", **flags)
    model = models.create(config, types.SimpleNamespace(image_shape=image_shape, num_classes=classes))
    model(tf.zeros([1, *image_shape]))
    return model, config


@pytest.mark.parametrize("naming, prefix, file_grid, image_shape, normalize, pooling", [
    ("AugReg", "", (2, 2), (32, 32, 3), "none", "token"),
    ("AugReg", "", (3, 3), (64, 64, 3), "imagenet", "token"),
    ("big_vision", "params/", (4, 4), (48, 32, 3), "none", "gap"),
    ("big_vision", "", (4, 4), (48, 48, 3), "imagenet", "token"),
], ids=["augreg_same_grid", "augreg_3x3_to_4x4_imagenet_inputs", "big_vision_gap_4x4_to_3x2",
        "big_vision_token_4x4_to_3x3"])
def test_an_npz_import_matches_an_independent_forward_pass_of_the_file(
        shallow_models, tmp_path, naming, prefix, file_grid, image_shape, normalize, pooling):
    """The logits of the loaded model on the run's inputs equal the reference's on the file's pixels (1e-5: float32
    against float64, sums of 768 products at most)."""
    arrays = vit_file(0, file_grid, naming, token=pooling == "token", prefix=prefix)
    model, config = built(image_shape, normalize=normalize, vit_pooling=pooling)
    line = _vit_npz.load(model, save(arrays, str(tmp_path / "vit.npz")), config)
    pixels = np.random.default_rng(1).uniform(0, 1, (2, *image_shape)).astype(np.float32)
    inputs = pixels if normalize == "none" else (pixels - NORMALIZATIONS[normalize][0]) / NORMALIZATIONS[normalize][1]
    logits = model(inputs.astype(np.float32)).numpy()
    expected = reference_logits(arrays, pixels, naming, prefix)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # Logits that differ by input, not a constant.
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert line.startswith(f"Initialised weights from {tmp_path}/vit.npz (a ViT in {naming} names); its patch "
                           f"embedding takes this run's inputs (--normalize={normalize})") and "fresh" not in line
    grid = (image_shape[0] // PATCH, image_shape[1] // PATCH)
    kept = ", the class token's kept" if pooling == "token" else ""
    resampled = (f"; position embeddings resampled from a {file_grid[0]}x{file_grid[1]} grid of patches to "
                 f"{grid[0]}x{grid[1]} (bilinear{kept})")
    assert (resampled in line) == (file_grid != grid)


def test_npz_misfits_are_one_line_each_and_change_nothing_and_the_head_rule(shallow_models):
    """Read through TensorFlow's filesystems (ram://)."""
    model, config = built()
    before = [v.numpy() for v in model.variables]
    good = vit_file(0, (2, 2))
    block = "Transformer/encoderblock_1/"
    misfits = {
        "no such file": None,
        "is not a readable .npz file of arrays": b"PK not a zip",
        r"holds no big_vision ViT: no embedding/kernel among its 1 arrays \(conv/kernel\)": {"conv/kernel": good[
            "embedding/kernel"]},
        f"lacks {block}MlpBlock_3/Dense_1/bias, which": {k: v for k, v in good.items() if k != f"{block}MlpBlock_3/"
                                                                                          "Dense_1/bias"},
        rf"{block}MultiHeadDotProductAttention_1/query/kernel has shape \[192, 4, 48\], the model needs \[192, 3, 64\]":
            {**good, f"{block}MultiHeadDotProductAttention_1/query/kernel": np.zeros([192, 4, 48], np.float32)},
        r"holds a ViT of 32x32-pixel patches \(embedding/kernel \[32, 32, 3, 192\]\); --model=vit_ti16 has 16-pixel":
            vit_file(0, (1, 1), patch=32),
        r"holds a ViT of width 384 \(embedding/kernel \[16, 16, 3, 384\]\); --model=vit_ti16 has width 192":
            vit_file(0, (2, 2), width=384, heads=6),
        r"holds a ViT of 3 encoder blocks \(Transformer/encoderblock_\*\); --model=vit_ti16 has 2":
            vit_file(0, (2, 2), depth=3),
        r"holds a ViT of no class token \(cls\): build vit_\* with --vit_pooling=gap": vit_file(0, (2, 2), token=False),
        r"position embeddings of shape \[1, 7, 192\] hold no square grid of patches after 1 token of their own":
            vit_file(0, (2, 3)),
    }
    for i, (message, content) in enumerate(misfits.items()):
        path = f"ram://npz/misfit{i}.npz"
        if isinstance(content, dict):
            save(content, path)
        elif content is not None:
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(content)
        with pytest.raises(UserError, match=message) as raised:
            _vit_npz.load(model, path, config)
        assert "\n" not in str(raised.value)
    for value, v in zip(before, model.variables):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)

    seven_classes = vit_file(0, (2, 2), classes=7)
    line = _vit_npz.load(model, save(seven_classes, "ram://npz/head7.npz"), config)
    assert "; not loaded, made fresh (zeros): the head (the file's head/kernel [192, 7], the model's [192, 10])" in line
    assert not np.any(model.classifier.kernel.numpy()) and not np.any(model.classifier.bias.numpy())
    np.testing.assert_array_equal(model.class_token.numpy(), seven_classes["cls"])
    skipped, config = built(init_skip="head", init_checkpoint="unused")
    line = _vit_npz.load(skipped, save(good, "ram://npz/good.npz"), config)
    assert line.endswith("; not loaded, made fresh (zeros): the head (--init_skip=head)")
    assert not np.any(skipped.classifier.kernel.numpy())
    assert _vit_npz.load(model, "ram://npz/good.npz", built()[1]).count("fresh") == 0
    np.testing.assert_array_equal(model.classifier.kernel.numpy(), good["head/kernel"])


@pytest.mark.slow  # 10 s: the training entry point traces a ViT's train and eval steps.
def test_init_checkpoint_from_a_vit_run_at_another_image_size(shallow_models, mock_tfds, capsys, tmp_path):
    """A 32 px vit_ti16's checkpoint (a 2x2 grid of patches) starts a 48 px linear probe (3x3) through the training
    entry point: the position embeddings are resampled bilinearly, the class token's row kept, and the line says so;
    frozen by the probe, they are in its checkpoint as they were read."""
    source, _ = built((32, 32, 1))
    source.position_embedding.assign(np.random.default_rng(0).normal(size=[1, 5, WIDTH]))
    prefix = tf.train.Checkpoint(model_variables=list(source.variables)).write(str(tmp_path / "source" / "ckpt"))
    trainer.train_and_evaluate(make_config(tmp_path / "probe", model="vit_ti16", image_size=48, init_checkpoint=prefix,
                                           trainable="head", train_steps=1, eval_every=1, checkpoint_every=1))
    assert ("; position embeddings resampled from a 2x2 grid of patches to 3x3 (bilinear, the class token's kept): "
            "vit_ti16/position_embedding [1, 5, 192] -> [1, 10, 192]") in capsys.readouterr().out
    held, probe = latest_values(prefix), latest_values(tmp_path / "probe")
    position = [v.path for v in source.variables].index("vit_ti16/position_embedding")
    expected = tf.raw_ops.ResizeBilinear(images=held[position][:, 1:].reshape(1, 2, 2, -1), size=[3, 3],
                                         align_corners=True).numpy().reshape(1, 9, -1)
    np.testing.assert_array_equal(probe[position][:, :1], held[position][:, :1])
    np.testing.assert_allclose(probe[position][:, 1:], expected, rtol=1e-6, atol=1e-6)
    for i, value in enumerate(held[:position + 2]):  # The class token and the patch embedding are read as they are.
        if i != position:
            np.testing.assert_array_equal(probe[i], value)


def test_pretrained_npz_starts_a_vit_run_through_the_families_hook(shallow_models, mock_tfds, capsys, tmp_path):
    """--pretrained=FILE.npz on vit_ti16 (the registry's hook, research/models/vit.py): the run's first checkpoint
    holds the file's patch embedding (after the pipeline's [0, 1] pixels are folded in) and a zero head for
    CIFAR-10's classes, at learning rate ~0; a word is refused in one line."""
    path = save(vit_file(0, (2, 2), classes=1000), str(tmp_path / "augreg.npz"))
    model, config = built(classes=10)
    _vit_npz.load(model, path, config)
    run = make_config(tmp_path / "run", model="vit_ti16", dataset="cifar10", pretrained=path, train_steps=1,
                      learning_rate=1e-12, eval_every=1, checkpoint_every=1)
    trainer.train_and_evaluate(run)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Initialised weights"))
    assert "augreg.npz (a ViT in AugReg names)" in line and "made fresh (zeros): the head" in line
    trained = latest_values(run.model_dir)
    assert len(trained) == len(model.variables)
    for value, variable in zip(trained, model.variables):
        np.testing.assert_allclose(value, variable.numpy(), atol=1e-6, err_msg=variable.path)
    assert not np.any(model.classifier.kernel.numpy())  # 1000 classes in the file, 10 here: fresh, at zero.
    with pytest.raises(UserError, match="--pretrained=imagenet: vit_\\* models know no named weights"):
        trainer.train_and_evaluate(make_config(tmp_path / "word", model="vit_ti16", dataset="cifar10",
                                               pretrained="imagenet", train_steps=1))
