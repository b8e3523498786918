"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

Whatever wrote the temporary file or folder (safetensors replaces a file with one of mode 0600), the
output gets the usual permissions before the rename: files 0666 and folders 0777, less the umask.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path):
    """chmod a file, or a folder and everything in it, to 0666 (files) / 0777 (folders) less the umask."""
    mask = _umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file path next to `path`; rename it to `path` if the block succeeds.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        usual_permissions(tmp)  # mkstemp makes 0600, and the writer may have replaced the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder next to `path`; rename it to `path` if the block succeeds.

    A folder left half-written by a killed job keeps its temporary name and is never
    mistaken for a finished one. An existing `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
