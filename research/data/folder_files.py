"""The image files of a `folder:PATH` dataset: what each split folder holds, what was skipped and why, and TFDS
slicing over a fixed order of the files.

Why this order: TFDS slices (`train[:90%]`, `train[90%:]`) take a range of the split's examples, and a range of
files sorted by class holds only some of the classes (the README's validation recipe then evaluated on classes
training never saw). Each class's files are ordered by a stable hash of their path within the split (SHA-256,
independent of --seed, as TFDS orders prepared examples by a hash of their key), and the classes are interleaved
in proportion: the k-th of a class's n files stands at (k + 1/2) / n of the split. So any slice holds every class
in proportion, to within one file (where a slice is at least one file per class), and complementary slices stay
disjoint and fixed however the run is seeded.

Every file under a class folder, at any depth, is an example of that class if `tf.io.decode_image` reads its
format; everything else (other files, hidden files, dangling links, files outside any class folder, names that
are not UTF-8) is skipped and counted, and `Listing.skipped_line()` says how many of each kind and why.
"""

import collections
import hashlib
import os

import tensorflow_datasets as tfds

from research import UserError

# What tf.io.decode_image reads (JPEG, PNG, GIF, BMP, WebP, JPEG XL), by file name.
EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".jxl")
NOT_UTF8 = "named in bytes that are not UTF-8 (rename them)"  # A kind of skipped file, as the line says it.


def subfolders(path):
    """The sorted names of the visible folders in `path`."""
    return sorted(entry.name for entry in _entries(path) if _is_dir(entry) and not entry.name.startswith("."))


def order_key(path_in_split):
    """Where a file stands among its class's files: a stable hash of its path within the split."""
    return hashlib.sha256(path_in_split.encode()).digest()[:8], path_in_split


def split_names(spec, flag):
    """The split folders a split spec reads (`train[:90%]+val` -> ['train', 'val']); a bad spec is a UserError."""
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec)
        return instructions, sorted({i.splitname for i in instructions.to_absolute(_AnyLength())})
    except (ValueError, AssertionError, TypeError) as e:
        raise UserError(f"--{flag}={spec}: {str(e).splitlines()[0]}") from None


class _AnyLength(dict):
    """Split lengths for resolving a spec's split names before the folders are listed."""

    def __missing__(self, name):
        return tfds.core.SplitInfo(name=name, shard_lengths=[2**40], num_bytes=0)

    def __contains__(self, name):
        return True


class Listing:
    """The files of a folder dataset's split folders, each listed once however many specs read it."""

    def __init__(self, root):
        self.root = root
        self._splits = {}
        self.skipped = collections.Counter()  # (kind, detail) -> files
        self.examples = {}  # kind -> the first path skipped as such, for the message

    def split(self, split, flag, spec):
        """{class folder: sorted [path relative to root]} of split folder `split`."""
        if split not in self._splits:
            folder = os.path.join(self.root, split)
            if not os.path.isdir(folder):
                if not subfolders(self.root):
                    raise UserError(f"folder:{self.root} has no images: expected {self.root}/<split>/<class>/*.jpg|png "
                                    "(e.g. train/cat/1.jpg, test/cat/2.jpg)")
                raise UserError(f"--{flag}={spec}: folder:{self.root} has no split folder {split}/ "
                                f"(it has {', '.join(f'{s}/' for s in subfolders(self.root)) or 'none'})")
            classes = {}
            for entry in _entries(folder):
                if not _is_utf8(entry.name):
                    self._skip(NOT_UTF8, f"{split}/{entry.name}")
                elif entry.name.startswith("."):
                    self._skip("hidden", f"{split}/{entry.name}")
                elif _is_dir(entry):
                    classes[entry.name] = sorted(self._images(entry.path, f"{split}/{entry.name}", set()))
                else:
                    self._skip("outside any class folder", f"{split}/{entry.name}")
            if not classes:
                raise UserError(f"folder:{self.root}/{split} has no class folders: expected "
                                f"{split}/<class>/*.jpg|png")
            self._splits[split] = classes
        return self._splits[split]

    def classes(self, spec, flag):
        """The sorted class folder names of the split folders `spec` reads."""
        _, splits = split_names(spec, flag)
        return sorted({name for split in splits for name in self.split(split, flag, spec)})

    def select(self, spec, flag, class_names):
        """[[path relative to root, label]] of split spec `spec`: TFDS slicing over each split folder's files of
        `class_names` (labels: positions in it) in the order above. Folders of other classes are left to the
        caller."""
        instructions, splits = split_names(spec, flag)
        labels = {name: label for label, name in enumerate(class_names)}
        files = {}
        for split in splits:
            placed = []
            for name, paths in self.split(split, flag, spec).items():
                if name in labels:
                    ranked = sorted(paths, key=lambda path: order_key(path[len(split) + 1:]))
                    placed += [((rank + 0.5) / len(ranked), order_key(path[len(split) + 1:]), path, labels[name])
                               for rank, path in enumerate(ranked)]
            files[split] = [(path, label) for *_, path, label in sorted(placed)]
        infos = {split: tfds.core.SplitInfo(name=split, shard_lengths=[len(f)], num_bytes=0)
                 for split, f in files.items()}
        chosen = []
        try:
            for instruction in instructions.to_absolute(infos):
                chosen += [[path, label] for path, label in files[instruction.splitname][instruction.from_:
                                                                                          instruction.to]]
        except (ValueError, AssertionError) as e:
            raise UserError(f"--{flag}={spec}: {str(e).splitlines()[0]}") from None
        if not chosen:
            raise UserError(f"--{flag}={spec} of folder:{self.root} is empty")
        return chosen

    def skipped_line(self):
        """One line: how many files of each kind were skipped and why, with an example of each; None if none."""
        if not self.skipped:
            return None
        kinds = collections.Counter()
        for (kind, _), count in self.skipped.items():
            kinds[kind] += count
        parts = []
        for kind, count in sorted(kinds.items(), key=lambda item: -item[1]):
            if kind == "not an image file":
                by_extension = sorted(((n, d) for (k, d), n in self.skipped.items() if k == kind), reverse=True)
                detail = ", ".join(f"{n} {d}" for n, d in by_extension[:4]) + (", ..." if len(by_extension) > 4
                                                                                else "")
                parts.append(f"{count} not of a format TensorFlow decodes ({detail}; e.g. {self.examples[kind]})")
            else:
                parts.append(f"{count} {kind} (e.g. {self.examples[kind]})")
        total = sum(kinds.values())
        return (f"folder:{self.root}: skipped {total} file{'s' * (total != 1)}: {'; '.join(parts)}. Images are "
                f"{'|'.join(EXTENSIONS)} files in <split>/<class>/ (any depth)")

    def _skip(self, kind, path, detail=""):
        self.skipped[kind, detail] += 1
        self.examples.setdefault(kind, path.encode(errors="surrogateescape").decode(errors="replace"))

    def _images(self, folder, relative, seen):
        """The image files under `folder` (relative to root: `relative`), at any depth; links followed once."""
        real = os.path.realpath(folder)
        if real in seen:
            return []
        seen.add(real)
        found = []
        for entry in _entries(folder):
            path = f"{relative}/{entry.name}"
            if not _is_utf8(entry.name):
                self._skip(NOT_UTF8, path)
            elif entry.name.startswith("."):
                self._skip("hidden", path)
            elif _is_dir(entry):
                found += self._images(entry.path, path, seen)
            elif not _is_file(entry):
                self._skip("dangling link" if entry.is_symlink() else "not a regular file", path)
            elif entry.name.lower().endswith(EXTENSIONS):
                found.append(path)
            else:
                self._skip("not an image file", path, os.path.splitext(entry.name)[1].lower() or "no extension")
        return found


def _is_utf8(name):
    """Whether a file name is text: a name of other bytes cannot go into data_files.json or a TensorFlow path."""
    try:
        name.encode()
        return True
    except UnicodeEncodeError:
        return False


def _entries(path):
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as e:
        raise UserError(f"cannot list {path}: {e.strerror}") from None


def _is_dir(entry):
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry):
    try:
        return entry.is_file()
    except OSError:
        return False
