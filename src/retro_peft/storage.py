"""Atomic writes: a file is either fully written or not there at all.

The pattern everywhere is: write to a temporary name in the same folder, fsync
it, rename it over the final name (atomic on POSIX), then fsync the folder so
the rename itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable

from retro_peft.errors import InputError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The process's umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def share(path: Path) -> None:
    """Give a file, or a folder and everything in it, the mode this process's new files get (0644 / 0755
    under umask 022). Temporary files and folders (mkstemp, mkdtemp, safetensors' own writer) are private
    (0600 / 0700); what is renamed into place must not be: a server running as another user reads the
    adapters, indexes and caches a training job wrote."""
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~_UMASK)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary_path)` writes the file (a library's own save function); it is then fsynced and
    renamed over `path`. If `write` fails, `path` is as it was and the temporary file is gone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        share(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the folders themselves (for files written by libraries)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Checksum of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_folder(new: Path, target: Path, *, carry_over: set[str] = frozenset()) -> None:
    """Put the complete folder `new` at `target` in one step, so readers see the old folder or the new one.

    `new` must be a sibling of `target` (same file system). Entries of the old
    folder named in `carry_over` that `new` lacks (a training run's checkpoints)
    are moved into the new folder afterwards; until then they wait, whole, in the
    old folder's temporary name next to it.
    """
    new, target = Path(new), Path(target)
    share(new)
    fsync_tree(new)
    if not target.exists():
        os.rename(new, target)
        fsync_dir(target.parent)
        return
    if _exchange(new, target):
        old = new  # the names swapped: `new` now holds the old folder
    else:  # a moment without `target`, but the old folder stays whole under another name
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
    fsync_dir(target.parent)
    for name in carry_over:
        if (old / name).exists() and not (target / name).exists():
            os.rename(old / name, target / name)
    fsync_dir(target)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary folder next to `path`, which then replaces `path` (`replace_folder`):
    readers see no folder, the old one or the new one, never a part; a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path, what: str = "output file") -> None:
    """Refuse, before any work, a file path that cannot be written (a folder, or no writable folder above it)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    check_parent_writable(path, what)


def check_output_folder(path, overwrite: bool, what: str) -> None:
    """Refuse, before any work, a folder to write that exists (unless `overwrite`), is a file, or cannot be made."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another --out or pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; --out names a folder")
    check_parent_writable(path, what)


def check_parent_writable(path: Path, what: str) -> None:
    """The nearest existing folder above `path` (where missing folders would be created) must be writable."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():  # also walks up past a file used as a folder (`file/x` does not exist)
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: {parent} is not writable")
