"""Writing files so that a reader, a crash or a full disk never leaves a half-written one behind.

Every file and directory maskedlm writes goes through here: write under a temporary name beside the target, fsync,
then rename over it (a rename within one directory is atomic on POSIX). This module knows nothing about what is
written; callers pass text, bytes or a function that fills a path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flush `path` (a file or a directory entry list) to disk; silently skipped where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    # One place that opens a file for text, so tests can simulate a full disk by replacing it.
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary sibling of `path`, fsync it, then rename it over `path`.

    Readers see the old file or the new one, never a half; on any error the temporary file is removed and the old
    file is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    """`text` into `path` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: _write_text(tmp, text))


def link_or_copy(src, dst) -> bool:
    """`dst` as a hard link to `src` (no data copied; the file lives on while either name does), or a copy where
    the filesystem cannot link (another device, no hard links). Returns whether it linked. `dst` is meant to lie in
    a directory built beside its target and renamed into place (replace_dir), which makes the whole atomic."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        fsync_path(Path(dst))
        return False


def temp_dir_beside(out, tag: str) -> Path:
    """A fresh, empty hidden directory next to `out` to build a whole output in before `replace_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{tag}-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def replace_dir(tmp, out) -> None:
    """Put the finished directory `tmp` at `out` with renames, so a reader never sees a half-written directory.

    An existing `out` is first renamed aside and deleted only after `tmp` is in place; if that rename fails the old
    directory is put back. Callers decide beforehand whether `out` may be replaced at all.
    """
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
