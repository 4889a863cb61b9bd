"""Every flag declares its role where it is defined, and every consumer reads the roles from research.config: the
resume guard, the flags history, HParams, the ignored-flag warning, the sweep; and the import graph runs one way."""

import ast
import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import make_config
from research import UserError, config as config_lib, trainer
from research.data import input_benchmark, verify  # noqa: F401 - their flags and arguments count too.
from research import benchmark, evaluate, export, predict  # noqa: F401
from launch import sweep  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_flag_of_ours_declares_its_role():
    ours = {flag.name for module, module_flags in config_lib.FLAGS.flags_by_module_dict().items()
            if module.split(".")[0] in ("research", "launch") for flag in module_flags}
    assert len(ours) > 60
    undeclared = sorted(name for name in ours if config_lib.declared(name) is None)
    assert not undeclared, f"flags without a declared role: {undeclared}"
    assert {"momentum", "label_smoothing", "hidden_units", "augment", "crop_scale",
            "mixup_alpha"} <= set(config_lib.names_with(config_lib.CHECKPOINT))
    assert config_lib.declared("tfds_read").role == config_lib.RUNTIME
    assert config_lib.declared("benchmark_steps").role == config_lib.TOOL
    assert {"model_dir", "data_dir", "tfds_manual_dir"} == set(config_lib.names_with(config_lib.PATH))
    flagfile = config_lib.to_flagfile(make_config("x"))
    assert "--benchmark_steps" not in flagfile and "--hidden_units=16" in flagfile  # Tools' flags are no run's.


@pytest.fixture
def sgd_run(mock_tfds, tmp_path):
    config = make_config(tmp_path / "run", optimizer="sgd", train_steps=8, eval_every=8)
    trainer.train_and_evaluate(config)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(momentum="0.9"), dict(label_smoothing="0.1")])
def test_resume_refuses_a_changed_momentum_or_loss(sgd_run, change):
    run = sgd_run.model_dir
    before = {name: open(os.path.join(run, name), "rb").read() for name in sorted(os.listdir(run))
              if os.path.isfile(os.path.join(run, name))}
    name = next(iter(change))
    with pytest.raises(UserError, match=rf"other settings \(--{name}: 0.0 -> {change[name]}\)"):
        trainer.train_and_evaluate(make_config(run, optimizer="sgd", train_steps=12, eval_every=8, **change))
    assert before == {name: open(os.path.join(run, name), "rb").read() for name in before}  # Nothing rewritten.


def test_resume_records_what_a_researcher_changes_on_purpose(sgd_run, capsys):
    run = sgd_run.model_dir
    trainer.train_and_evaluate(make_config(run, optimizer="sgd", train_steps=12, eval_every=8, learning_rate="0.01",
                                           checkpoint_every=2))
    assert "Resuming from" in capsys.readouterr().out
    [record] = [json.loads(line) for line in open(os.path.join(run, "flags_history.jsonl"))]
    assert record["step"] == 8
    assert record["changes"] == {"learning_rate": ["0.001", "0.01"], "train_steps": ["8", "12"],
                                 "checkpoint_every": ["4", "2"]}
    assert "--learning_rate=0.01\n" in open(os.path.join(run, "flags.txt")).read()


def test_a_value_without_effect_is_one_warning_line(mock_tfds, tmp_path, caplog):
    config = make_config(tmp_path / "run", crop_scale="0.5,1", randaugment_magnitude="5", conv_layers="8c3",
                         momentum="0.9", train_steps=4)
    assert config_lib.ignored(config) == [
        "--randaugment_magnitude=5.0 (only with --augment=randaugment)",
        "--crop_scale=0.5,1.0 (only with --augment=random_resized_crop)",
        "--conv_layers=8c3 (only with --model=convnet)",
        "--momentum=0.9 (only with --optimizer=rmsprop or sgd)"]
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(config)
    [warning] = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert "--crop_scale=0.5,1.0" in warning and "\n" not in warning
    # Defaults, values spelled otherwise, and flags that apply are no warning.
    plain = dict(model_dir="x", train_steps=1)
    assert config_lib.ignored(config_lib.make_config(**plain, crop_scale="0.080,1", model="convnet",
                                                     conv_layers="8c3")) == []
    assert config_lib.ignored(config_lib.make_config(**plain, augment="random_resized_crop", crop_scale="0.5,1")) == []
    # --dropout, by what each model says in its registration: cnn has no dropout layer, convnet one only at a `d`.
    dropout = "--dropout=0.3 (only with a model that has dropout layers)"
    assert config_lib.ignored(config_lib.make_config(**plain, model="cnn", dropout="0.3")) == [dropout]
    assert config_lib.ignored(config_lib.make_config(**plain, model="convnet", conv_layers="8c3",
                                                     dropout="0.3")) == [dropout]
    assert config_lib.ignored(config_lib.make_config(**plain, model="convnet", conv_layers="8c3,d",
                                                     dropout="0.3")) == []
    assert config_lib.ignored(config_lib.make_config(**plain, model="mlp", dropout="0.3")) == []


@pytest.mark.parametrize("flag, value, message", [
    ("momentum", "-1", "--momentum must be in [0, 1)"), ("momentum", "1", "--momentum must be in [0, 1)"),
    ("ema_decay", "1", "--ema_decay must be in [0, 1)"), ("weight_decay", "-0.1", "--weight_decay must be >= 0"),
    ("decay_steps", "0", "--decay_steps must be positive"), ("decay_rate", "0", "--decay_rate must be positive"),
    ("warmup_steps", "-3", "--warmup_steps must be >= 0"),
])
def test_optimizer_and_schedule_values_out_of_range_are_one_line(flag, value, message):
    """Checked with the other flags, not left to a Keras constructor's traceback halfway through the build."""
    with pytest.raises(UserError) as error:
        config_lib.make_config(model_dir="unused", train_steps=1, optimizer="sgd", lr_schedule="exponential",
                               **{flag: value})
    assert str(error.value) == message


def test_vit_needs_sides_that_are_multiples_of_its_patches(mock_tfds, tmp_path):
    with pytest.raises(UserError, match="multiples of its 16-pixel patches, not 24x24 .it would see 44% of each"):
        trainer.train_and_evaluate(make_config(tmp_path / "run", model="vit_ti16", image_size="24"))


@pytest.mark.slow
def test_a_sweep_plans_and_dry_runs_without_tensorflow(tmp_path):
    code = ("import sys; from research import cli; from launch import sweep; "
            f"status = cli.run(sweep.main, ['--root={tmp_path}', '--flagfile=configs/mlp_mnist.cfg', "
            "'--grid=learning_rate=1e-3,3e-3', '--seeds=2', '--train_epochs=1', "
            "'--tfds_manual_dir=../shared/datasets/mnist', '--nodeterministic', '--dry_run']); "
            "assert status == 0; print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and lines[-1] == "False" and "--learning_rate=3e-3 --seed=1" in lines[3]
    assert not os.listdir(tmp_path)  # A dry run writes nothing.


# Packages whose __init__ imports submodules by name (importlib), which no import statement shows.
IMPORTED_BY_PACKAGE = {"research.data": lambda sub: sub.endswith("_source"),
                       "research.models": lambda sub: not sub.startswith("_") and sub != "registry",
                       "research.augment": lambda sub: not sub.startswith("_")}


def _import_graph():
    """{module: modules of research/ and launch/ it imports, at the top or inside a function}."""
    paths = {}
    for top in ("research", "launch"):
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            for file in files:
                if file.endswith(".py"):
                    name = os.path.relpath(os.path.join(directory, file), REPO)[:-3].replace(os.sep, ".")
                    paths[name.removesuffix(".__init__")] = os.path.join(directory, file)
    graph = {}
    for name, path in paths.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.module in paths:
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                             for a in node.names}
        if name in IMPORTED_BY_PACKAGE:
            imported |= {m for m in paths if m.rpartition(".")[0] == name
                         and IMPORTED_BY_PACKAGE[name](m.rpartition(".")[2])}
        graph[name] = imported - {name}
    return graph


def test_the_import_graph_runs_one_way():
    graph = _import_graph()
    assert graph["research.config"] == {"research"} and graph["research"] == set()
    assert graph["research.fs"] == {"research"}
    assert graph["research.run_dir"] <= {"research", "research.config", "research.fs"}
    assert graph["research.lock"] <= {"research", "research.fs", "research.run_dir"}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for imported in sorted(graph[module]):
                visit(imported)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
