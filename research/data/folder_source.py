"""A researcher's own images: `--dataset=folder:PATH` reads the image files of PATH/<split>/<class>/.

The classes are the sorted class folder names of the training split (--train_split): an evaluation split may lack
some of them (one warning line names them: their accuracy is not measured) but may hold no other (an error names
it: a misspelt `sevn/` beside `seven/` would otherwise add a class that is never trained), and a dataset of one
class is an error. A split flag names a split folder, with TFDS slicing (`train[:90%]`, `train[90%:]`,
`train[:500]+val`) over the split's files in a fixed hash order, so that every slice holds every class in
proportion (research/data/folder_files.py, which also says what it skipped).

Why the file lists are kept in the run directory (`data_files.json`): the batches of a step are a function of
(seed, step) *and of the list of files*; a folder that gained or lost files since the run started would shift
every later batch. So a run records the lists it trains on, and a resume (or `research.evaluate`) reads exactly
those files again, saying so when the folder has gained files since, and refusing when it lost some. The lists
travel in `Dataset.file_lists`; only research.train writes them, once a run has passed its resume checks: loading
the data never changes the run directory. On resume the run's class names (dataset.json) are the truth: a folder
whose training classes differ from them is refused, since every label would shift against the checkpoint.
The lists hold paths within the folder, so a folder that moved is read where it is now, given as
`--dataset=folder:NEW_PLACE` to the resume or the tools: it must hold every recorded file.
"""

import os

from absl import logging

from research import UserError, fs, run_dir
from research.data import folder_files, preprocess, sources
from research.data.dataset import Dataset

CHANNELS = 3  # Grayscale and RGBA files are converted: one input layout for every file of a folder.


@sources.register("folder")
def open_folder(config, root):
    if fs.is_url(root):
        raise UserError(f"--dataset=folder:{root}: image folders are read from local paths (or mounted ones), not "
                        "URLs; copy or mount the folder")
    root = os.path.normpath(os.path.abspath(root))
    recorded = run_dir.read_data_files(config.model_dir)
    run_classes = recorded.get("class_names") or run_dir.recorded_class_names(config.model_dir)
    if not os.path.isdir(root):
        if run_classes:
            raise UserError(f"folder:{root} no longer exists, and {config.model_dir} was trained on it: put the "
                            "folder back there, or pass --dataset=folder:NEW_PLACE where it moved (the run reads "
                            "the files it recorded, by their paths within the folder)")
        raise UserError(f"--dataset=folder:{root}: " + ("a file, not a folder of split folders" if os.path.exists(root)
                                                        else "no such directory"))
    prep = preprocess.preprocessing(config, (None, None, CHANNELS), CHANNELS)  # (After: a missing folder first.)
    listing = folder_files.Listing(root)
    lists = dict(recorded.get("splits", {}))
    class_names = run_classes
    if config.train_split and config.train_split not in lists:
        class_names = _training_classes(listing, config.train_split, run_classes, config.model_dir)
    elif not class_names:  # Evaluation alone, of no run (research.data.verify): the split's own folders.
        class_names = listing.classes(config.eval_split, "eval_split")
    if config.train_split and len(class_names) < 2:
        raise UserError(f"folder:{root} has one class ({class_names[0]}/): a classifier needs at least two class "
                        f"folders in each split folder")
    opened = {}
    for flag, spec in [("train_split", config.train_split), ("eval_split", config.eval_split),
                       *(("extra_eval", split) for split in config.extra_eval)]:
        if not spec:
            continue
        if spec in lists:
            _check_recorded(listing, spec, flag, lists[spec], class_names, config.model_dir)
        else:
            lists[spec] = _list_split(listing, spec, flag, class_names)
        paths, labels = zip(*lists[spec])
        opened[flag, spec] = sources.FileSource(root, paths, labels, f"folder:{root} {spec}")
    if listing.skipped_line():
        logging.warning("%s", listing.skipped_line())
    if recorded and recorded["root"] != root:  # Every recorded file was found under the new root (above).
        print(f"folder:{root}: reading the files {config.model_dir} recorded in folder:{recorded['root']}, "
              "which moved here")
    train, evaluated = opened.get(("train_split", config.train_split)), opened["eval_split", config.eval_split]
    if train:
        shared = len(set(train.paths) & set(evaluated.paths))
        if shared:
            logging.warning("--eval_split=%s shares %d of its %d files with --train_split=%s: its accuracy is "
                            "measured on images the model trains on", config.eval_split, shared,
                            len(evaluated), config.train_split)
    return Dataset(f"folder:{root}", (*prep.image_size, CHANNELS), class_names, train, evaluated, prep,
                   (None, None, CHANNELS), f"streamed from the image files in {root}",
                   file_lists={"root": root, "class_names": class_names, "splits": lists},
                   extra_eval=tuple((split, opened["extra_eval", split]) for split in config.extra_eval))


def _training_classes(listing, spec, run_classes, model_dir):
    """The class folders of the training split; on resume they must be the run's own classes."""
    names = listing.classes(spec, "train_split")
    if run_classes and names != list(run_classes):
        new, gone = sorted(set(names) - set(run_classes)), sorted(set(run_classes) - set(names))
        change = "; ".join(part for part in (new and f"new {', '.join(new)}", gone and f"gone {', '.join(gone)}",
                                             not (new or gone) and "the same names in another order") if part)
        raise UserError(f"folder:{listing.root} --train_split={spec} has class folders other than the "
                        f"{len(run_classes)} classes {model_dir} was trained on ({change}): every label would "
                        "shift against its checkpoint; rename the folders back, or train in a new --model_dir")
    return names


def _list_split(listing, spec, flag, class_names):
    """The files of a split not recorded yet, checked against the classes."""
    _, splits = folder_files.split_names(spec, flag)
    with_images = {name for split in splits for name, paths in listing.split(split, flag, spec).items() if paths}
    if flag == "train_split":
        for split in splits:
            for name, paths in listing.split(split, flag, spec).items():
                if not paths:
                    raise UserError(f"{listing.root}/{split}/{name} has no images (files of a format TensorFlow "
                                    "decodes: .jpg, .png, .gif, .bmp, .webp, .jxl): remove the folder or add them")
    else:
        foreign = sorted(with_images - set(class_names))
        if foreign:
            raise UserError(f"--{flag}={spec} of folder:{listing.root} has class folders that training lacks: "
                            f"{', '.join(foreign)} (the classes are the training split's folders: "
                            f"{', '.join(class_names)}); rename or remove them")
    listed = listing.select(spec, flag, class_names)
    absent = sorted(set(class_names) - {class_names[label] for _, label in listed})
    if absent:
        logging.warning("--%s=%s of folder:%s has no images of %d of the %d classes (%s)%s", flag, spec, listing.root,
                        len(absent), len(class_names), ", ".join(absent[:10]) + (", ..." if len(absent) > 10 else ""),
                        ": they are trained on, never measured" if flag != "train_split" else
                        ": the model never sees them")
    return listed


def _check_recorded(listing, spec, flag, recorded, class_names, model_dir):
    """A recorded split is read as recorded: every file must still be there; files added since are noted."""
    recorded_path = fs.join(model_dir, run_dir.DATA_FILES_FILE)
    missing = [path for path, _ in recorded if not os.path.isfile(os.path.join(listing.root, path))]
    if missing:
        raise UserError(f"folder:{listing.root} lacks {len(missing)} of the {len(recorded)} files {model_dir} "
                        f"read as {spec} (e.g. {missing[0]}): put them back (the run reads exactly the files "
                        f"listed in {recorded_path}), or train in a new --model_dir")
    try:
        now = {path for path, _ in listing.select(spec, flag, class_names)}
    except UserError:
        return
    before = {path for path, _ in recorded}
    if before != now:
        print(f"folder:{listing.root} changed since the run listed {spec} ({len(now - before)} files added, "
              f"{len(before - now)} left out): reading the {len(recorded)} files it trained on, as recorded in "
              f"{recorded_path}")
