"""Every recipe flagfile parses, says how to run it, and trains (a few steps on mock data: Fashion-MNIST and
CIFAR-10 cannot be downloaded on the CI machine)."""

import glob
import os

import pytest

from research import config as config_lib, run_dir, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.cfg")) if not p.endswith("base.cfg"))


def _flagfile_values(path):
    """The flags a flagfile sets (nested --flagfile included), as make_config overrides."""
    lines = config_lib.FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=False)
    return run_dir.parse_flagfile("\n".join(lines), path)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses_documents_itself_and_trains(mock_tfds, tmp_path, monkeypatch, path):
    name = os.path.basename(path)
    header = open(path).read().split("\n--", 1)[0]
    assert f"python -m research.train --flagfile=configs/{name}" in header
    monkeypatch.chdir(REPO)  # Nested --flagfile paths are relative to the repo root.
    values = _flagfile_values(path)
    assert values["model_dir"] == f"runs/{name[:-len('.cfg')]}"
    config_lib.make_config(**{**values, "model_dir": str(tmp_path)})  # Every flag as written parses and validates.
    if name.startswith(("imagenet_", "smoke_")):
        return  # ImageNet-size networks: trained at 32 px in tests/test_models.py.
    values.update(model_dir=str(tmp_path), train_steps=2, steps_per_loop=1, eval_every=2, batch_size=8)
    results = trainer.train_and_evaluate(config_lib.make_config(**values))
    assert results["step"] == 2 and results["eval"]["examples"] == 64 and results["model"] == values["model"]
