"""Files on any filesystem TensorFlow can write, through `tf.io.gfile`: local paths and URLs alike (gs://, s3://,
hdfs://, or ram://, TensorFlow's in-memory filesystem, which the tests use as a stand-in for object storage). A URL
is never a local path. Each file is written whole: under a temporary name and then renamed where the filesystem
renames (local disks, NFS, HDFS), so that a reader or a kill never meets half a file; written in one piece where it
cannot (an object store's upload is atomic by itself). Object stores cannot append, so appending a line rewrites the
file. research/run_dir.py names the files of a run directory and reads and writes each through these.
"""

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile

from research import UserError


def tensorflow():
    """TensorFlow, imported at the first file operation rather than with this module: a sweep's --dry_run names its
    runs' paths and finds the finished local ones without loading it (it takes seconds)."""
    import tensorflow  # noqa: PLC0415 - see above.
    return tensorflow


def gfile():
    return tensorflow().io.gfile


def join(*parts):
    return posixpath.join(*parts)  # What tf.io.gfile.join does on POSIX systems, for local paths and URLs alike.


def is_url(path):
    return "://" in str(path)


def exists(path):
    return gfile().exists(path) if is_url(path) else os.path.exists(path)  # (See tensorflow.)


def isdir(path):
    return gfile().isdir(path)


def listdir(path):
    return sorted(gfile().listdir(path))


def glob(pattern):
    return gfile().glob(pattern)


def makedirs(path):
    gfile().makedirs(path)


def remove(path):
    with contextlib.suppress(tensorflow().errors.OpError):
        gfile().remove(path)


def remove_tree(path):
    with contextlib.suppress(tensorflow().errors.OpError):
        gfile().rmtree(path)


def check_filesystem(path, flag="--model_dir"):
    """One error line, before any work, for a path TensorFlow cannot open: an unknown scheme, missing credentials
    or an unreachable object store."""
    try:
        gfile().exists(path)
    except tensorflow().errors.OpError as e:
        raise UserError(f"{flag}={path}: TensorFlow cannot open it ({e.message.splitlines()[0][:200]})") from None


# ------------------------------------------------------------------------------------------------ Whole files
def read_bytes(path):
    try:
        with gfile().GFile(path, "rb") as f:
            return f.read()
    except tensorflow().errors.OpError as e:
        raise UserError(f"cannot read {path}: {e.message}") from None


def read_text(path):
    try:
        return read_bytes(path).decode()
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def write(path, data):
    """Writes `data` (str or bytes) to `path` whole: see the module docstring."""
    data = data.encode() if isinstance(data, str) else data
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with gfile().GFile(temporary, "wb") as f:
            f.write(data)
        try:
            gfile().rename(temporary, path, overwrite=True)
        except tensorflow().errors.UnimplementedError:  # No rename here: one upload is atomic by itself.
            gfile().remove(temporary)
            with gfile().GFile(path, "wb") as f:
                f.write(data)
    except tensorflow().errors.OpError as e:
        with contextlib.suppress(tensorflow().errors.OpError):
            gfile().remove(temporary)
        raise UserError(f"cannot write {path}: {e.message.splitlines()[0]}") from None
    return path


def write_json(path, value, indent=1):
    return write(path, json.dumps(value, indent=indent) + "\n")


def append_line(path, line):
    """Adds one line at the end: the file is rewritten whole (object stores cannot append)."""
    write(path, (read_text(path) if gfile().exists(path) else "") + line.rstrip("\n") + "\n")


def save_figure(figure, path, dpi=100, **options):
    """A matplotlib figure as a PNG file (rendered to bytes, then written like any other file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, **options)
    return write(path, buffer.getvalue())


def copy_tree(source, target):
    """Copies the directory `source` to `target` (which must not exist) file by file."""
    for directory, _, files in gfile().walk(source):
        relative = os.path.relpath(directory, source)
        destination = target if relative == "." else join(target, relative)
        gfile().makedirs(destination)
        for name in files:
            gfile().copy(join(directory, name), join(destination, name))


def sha256(path):
    """The SHA-256 of a file's bytes (hex), read in pieces."""
    digest = hashlib.sha256()
    try:
        with gfile().GFile(path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 24), b""):
                digest.update(piece)
    except tensorflow().errors.OpError as e:
        raise UserError(f"cannot read {path}: {e.message}") from None
    return digest.hexdigest()


@contextlib.contextmanager
def local_copy(path):
    """`path` itself if it is local, else a copy in a local temporary directory under the same file name (a
    reader that knows formats by their extension, such as Keras, sees the same name), removed afterwards."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, posixpath.basename(path))
        try:
            gfile().copy(path, local)
        except tensorflow().errors.OpError as e:
            raise UserError(f"cannot read {path}: {e.message}") from None
        yield local
