"""Writing files so that a reader, a crash or a full disk never leaves a half-written one behind.

Every file and directory maskedlm writes goes through here: write a temporary sibling, fsync, rename over the target
(atomic on POSIX). Callers pass text, bytes or a function that fills a path. Here too: where an output may go (never
over an input or a directory someone else wrote) and the one-writer-per-directory lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable

from maskedlm.errors import UserError


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
        pass
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise OSError(e.errno, e.strerror, str(dst)) from None  # what could not be written, not the source read
    fsync_path(Path(dst))
    return False


def temp_dir_beside(out, tag: str) -> Path:
    """A fresh, empty hidden directory next to `out` to build a whole output in before `replace_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out, tag)
    tmp = out.parent / f".{out.name}.{tag}-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def building(out, tag: str):
    """`with building(out, tag) as tmp:` a fresh `temp_dir_beside(out, tag)` to build a whole output in, removed if
    anything fails inside the block (the caller ends the block with `replace_dir(tmp, out)` on success)."""
    tmp = temp_dir_beside(out, tag)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# -- where an output may go ------------------------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    """`a` is `b` or lies somewhere below it (both resolved)."""
    return a == b or b in a.parents


def check_out(out, *, inputs=(), overwrite: bool = False, ours: Callable[[Path], bool] | None = None,
              what: str = "output") -> Path:
    """UserError unless `out` may become a whole output directory; returns it as a Path.

    `out` may not be, contain or lie inside an input (writing there would read our own output back, or delete what
    was read); it may not be a file or lie under one. An existing non-empty directory is replaced only with
    `overwrite` and only when `ours(out)` recognises it by the marker files this tool writes: anything else is the
    user's, never ours to delete.
    """
    out = Path(out)
    _check_inputs(out, inputs)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out else f"lies under {parent}, which is"
            raise UserError(f"--out {out} {where} a file, not a directory; choose another --out")
    _check_writable(out)
    if out.is_dir() and any(out.iterdir()):
        if ours is None or not ours(out):
            noun = what.removeprefix("an ").removeprefix("a ")
            raise UserError(f"--out {out} exists, is not empty and holds no {noun}; refusing to replace it (--overwrite "
                            "replaces only what maskedlm wrote); choose a new --out")
        if not overwrite:
            raise UserError(f"{out} already holds {what}; pass --overwrite to replace it, or choose a new --out")
    return out


def _check_inputs(out: Path, inputs) -> None:
    real = out.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a glob or a name that does not exist: its matches are passed separately
        inp = Path(item).resolve()
        if _inside(real, inp) or _inside(inp, real):
            rel = "is" if real == inp else ("lies inside" if _inside(real, inp) else "contains")
            raise UserError(f"--out {out} {rel} the input {item}; choose an --out outside every input")


def _check_writable(out: Path) -> None:
    """UserError unless the nearest existing folder at or above `out` can be written: a read-only disk or a folder
    without permission is found before any work, not when the result is saved."""
    here = next(p for p in [out, *out.parents] if p.exists())
    if here.is_dir() and not os.access(here, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(here) else "no permission to write there"
        raise UserError(f"--out {out}: cannot write in {here} ({why}); choose another --out")


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_out_file(out, *, inputs=(), ours: Callable[[Path], bool], what: str) -> Path:
    """UserError unless `out` may become a single output file: not an input or inside one, not under a file, not a
    directory, FIFO, device or socket (opening one could block forever), in a writable folder, and replacing an
    existing file only when `ours(out)` recognises it as `what` that maskedlm wrote."""
    out = Path(out)
    _check_inputs(out, inputs)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out} lies under {parent}, which is a file, not a directory; choose another --out")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file to write")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} is not a regular file (a FIFO, device or socket); choose another --out")
    _check_writable(out)
    if out.exists() and not ours(out):
        raise UserError(f"--out {out} exists and is not {what}; choose another --out ({what} is the only file "
                        "ever replaced)")
    return out


def remove_stale_temp_dirs(out, tag: str) -> None:
    """Delete `temp_dir_beside` folders of `out` left by processes that no longer run (a kill -9 mid-write)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}.{tag}-tmp-"
    for p in out.parent.iterdir():
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that id
    return True


# -- one writer per directory ----------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


def lock_dir(d) -> "DirLock":
    """An exclusive advisory lock on directory `d` (created if missing), held until `release()` or process exit.

    fcntl.flock on d/.lock: the kernel drops it when the process dies, so a kill -9 never leaves a directory stuck.
    A second holder is refused with UserError naming the first one's pid (written into the lock file).
    """
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{d} is in use by another maskedlm process (pid {holder}); wait for it to end, "
                        "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DirLock(fd)


class DirLock:
    """A held `lock_dir` lock; `release()` (or the process ending) lets the next writer in."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
