"""Atomic file and directory writes: results appear complete under their final name or not at all."""

import contextlib
import json
import os
import shutil
import tempfile

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same directory as `path`; rename it onto `path` if the block succeeds.

    Works for files and for directories (the block may create either at the yielded path). On failure the
    temporary is removed and `path` keeps its previous content.
    """
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.remove(tmp_path)  # the caller creates a file or a directory here
    try:
        yield tmp_path
        apply_default_permissions(tmp_path)
        if os.path.isdir(tmp_path) and os.path.isdir(path):
            # os.replace cannot swap onto a non-empty directory: move the old one aside first.
            old_path = tmp_path + ".old"
            os.replace(path, old_path)
            os.replace(tmp_path, path)
            shutil.rmtree(old_path, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
        _fsync_directory(directory)
    finally:
        if os.path.isdir(tmp_path):
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif os.path.exists(tmp_path):
            os.remove(tmp_path)


def apply_default_permissions(path):
    """Give `path` (and, for a directory, everything in it) the mode a plain `open()`/`mkdir()` would: the
    umask applied to 0666 for files and 0777 for directories.

    Temporary files are created private (0600, e.g. by `tempfile` and by safetensors), and a rename keeps
    that mode, so without this a result would be unreadable to the other users of a shared machine.
    """
    umask = current_umask()
    if not os.path.isdir(path):
        if os.path.exists(path):
            os.chmod(path, 0o666 & ~umask)
        return
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def current_umask():
    # os.umask can only be read by setting it; set it straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text_atomic(path, text):
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path, what):
    """A JSON object from `path`, or a one-line UserError naming the file and the problem."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: {what} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return values


def ensure_writable_dir(path, flag):
    """Create `path` if needed and check that files can be written there; `flag` names it in errors."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot create it ({error.strerror}); choose a writable directory") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable; choose a writable directory")
