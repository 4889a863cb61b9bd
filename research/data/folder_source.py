"""A researcher's own images: `--dataset=folder:PATH` reads PATH/<split>/<class>/*.{jpg,jpeg,png}.

Class names are the sorted names of the class folders found under any split folder (the same labels for every
split); a split flag names a split folder, with TFDS slicing (`train[:90%]`, `train[90%:]`, `train[:500]+val`),
applied to the split's files sorted by class and name. Files with other extensions are not read.

Why the file lists are kept in the run directory (`data_files.json`): the batches of a step are a function of
(seed, step) *and of the list of files*; a folder that gained or lost files since the run started would shift
every later batch. So the first run records the lists it trains on, and a resume (or `research.evaluate`) reads
exactly those files again, saying so when the folder has changed since.
"""

import os

import tensorflow_datasets as tfds

from research import UserError, run_dir
from research.data import preprocess, sources
from research.data.dataset import Dataset

EXTENSIONS = (".jpg", ".jpeg", ".png")
CHANNELS = 3  # Grayscale and RGBA files are converted: one input layout for every file of a folder.


@sources.register("folder")
def open_folder(config, root):
    root = os.path.normpath(os.path.abspath(root))
    prep = preprocess.preprocessing(config, (None, None, CHANNELS), CHANNELS)
    recorded_path = run_dir.join(config.model_dir, run_dir.DATA_FILES_FILE)
    recorded = run_dir.read_json(recorded_path) if run_dir.exists(recorded_path) else {}
    if recorded and recorded.get("root") != root:
        raise UserError(f"{config.model_dir} trained on folder:{recorded.get('root')}, not folder:{root}")
    class_names = recorded.get("class_names") or _class_names(root)
    lists = dict(recorded.get("splits", {}))
    opened = {}
    for flag in ("train_split", "eval_split"):
        spec = getattr(config, flag)
        if not spec:
            continue
        if spec in lists:
            try:
                listed = _list_split(root, spec, flag, class_names)
            except UserError:
                listed = None
            _say_if_changed(root, spec, lists[spec], listed, recorded_path)
        else:
            lists[spec] = _list_split(root, spec, flag, class_names)
        paths, labels = zip(*lists[spec]) if lists[spec] else ((), ())
        opened[flag] = sources.FileSource(root, paths, labels, f"folder:{root} {spec}")
    if run_dir.isdir(config.model_dir) and lists != recorded.get("splits"):
        run_dir.write_json(recorded_path, {"root": root, "class_names": class_names, "splits": lists}, indent=None)
    return Dataset(f"folder:{root}", (*prep.image_size, CHANNELS), class_names, opened.get("train_split"),
                   opened["eval_split"], prep, (None, None, CHANNELS), f"streamed from the image files in {root}")


def _class_names(root):
    if not os.path.isdir(root):
        raise UserError(f"--dataset=folder:{root}: no such directory")
    splits = _subfolders(root)
    names = sorted({name for split in splits for name in _subfolders(os.path.join(root, split))})
    if not names:
        raise UserError(f"folder:{root} has no images: expected {root}/<split>/<class>/*.jpg|png "
                        "(e.g. train/cat/1.jpg, test/cat/2.jpg)")
    return names


def _subfolders(path):
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def _list_split(root, spec, flag, class_names):
    """[[path relative to root, label]] of split `spec` (TFDS slicing over its sorted files)."""
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec)
        split_names = sorted({i.splitname for i in instructions.to_absolute(_AnyLength())})
    except (ValueError, AssertionError) as e:
        raise UserError(f"--{flag}={spec}: {str(e).splitlines()[0]}") from None
    files = {}
    for split in split_names:
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"--{flag}={spec}: folder:{root} has no split folder {split}/ "
                            f"(it has {', '.join(f'{s}/' for s in _subfolders(root)) or 'none'})")
        files[split] = _list_files(root, split, class_names)
    infos = {split: tfds.core.SplitInfo(name=split, shard_lengths=[len(f)], num_bytes=0) for split, f in files.items()}
    chosen = []
    for instruction in instructions.to_absolute(infos):
        chosen += files[instruction.splitname][instruction.from_:instruction.to]
    if not chosen:
        raise UserError(f"--{flag}={spec} of folder:{root} is empty")
    return chosen


class _AnyLength(dict):
    """Split lengths for resolving a spec's split names before the folders are listed."""

    def __missing__(self, name):
        return tfds.core.SplitInfo(name=name, shard_lengths=[2**40], num_bytes=0)

    def __contains__(self, name):
        return True


def _list_files(root, split, class_names):
    found = []
    classes = _subfolders(os.path.join(root, split))
    if not classes:
        raise UserError(f"folder:{root}/{split} has no class folders: expected {split}/<class>/*.jpg|png")
    for label, name in enumerate(class_names):
        folder = os.path.join(root, split, name)
        if name not in classes:
            continue  # A class this split lacks (e.g. a small test split); it keeps its label.
        images = sorted(entry.name for entry in os.scandir(folder)
                        if entry.is_file() and entry.name.lower().endswith(EXTENSIONS))
        if not images:
            raise UserError(f"{folder} has no images (.jpg, .jpeg or .png): remove the folder or add its images")
        found += [[f"{split}/{name}/{image}", label] for image in images]
    return found


def _say_if_changed(root, spec, recorded, listed, recorded_path):
    if listed is None:
        print(f"folder:{root} can no longer be listed as {spec}; the run's files of {spec} are listed in {recorded_path}")
        return
    before, now = {path for path, _ in recorded}, {path for path, _ in listed}
    if before != now:
        print(f"folder:{root} changed since the run listed {spec} ({len(now - before)} files added, "
              f"{len(before - now)} removed): reading the {len(recorded)} files it trained on, as recorded in "
              f"{recorded_path}")

