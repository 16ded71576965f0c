"""Atomic file and directory writes: results appear complete under their final name or not at all."""

import contextlib
import os
import shutil
import tempfile


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
