"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

A regular file (or a new one) is written to a temporary file beside it, ``.NAME.PID.RANDOM.tmp``,
then renamed over it. A special file (a FIFO, a device such as /dev/null or /dev/stdout) is written
through instead: renaming over it would replace the device with a plain file. A process killed
mid-write leaves its temporary file behind; the next write to the same name removes every such file
whose process is gone (the PID in the name says whose it was).

A folder of several files (a multi-config export) is built whole in a temporary folder beside the
target and swapped in with one exchange of names, so the target holds all old or all new files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cdka_search.errors import CdkaError, OutputError


def user_path(text: str, error: type[CdkaError], what: str = "path") -> Path:
    """``text`` as a Path with ``~`` expanded; ``error`` (one line) where it cannot be: ``~user`` of no
    such user, or no home directory (pathlib raises RuntimeError there)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise error(f"{what} {text!r}: cannot expand '~' (no such user or no home directory)") from None


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a PID we can ask about: leave its file alone
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files of writes to ``target`` whose writing process no longer runs."""
    prefix, removed = _temp_prefix(target), []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_alive(int(pid_text)):
            continue
        stale = target.parent / name
        try:
            if stale.is_dir() and not stale.is_symlink():
                import shutil

                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
        except OSError:
            pass
    return removed


def _write_through(target: Path, data: bytes) -> Path:
    try:
        with target.open("wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path``: atomically for regular files, straight through for special ones."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give a file name")
    try:
        mode = target.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        return _write_through(target, data)
    if target.is_symlink():
        target = Path(os.path.realpath(target))  # replace the file the link points to, keep the link
    import tempfile  # imported here: most commands never write a file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would have.
        os.fchmod(fd, mode & 0o7777 if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths' names in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_folder(root: str | os.PathLike[str], files: dict[str, bytes]) -> list[Path]:
    """Make ``root`` hold exactly ``files`` (relative path -> bytes), all or nothing: built in a
    temporary folder beside it and swapped in whole; what ``root`` held before is removed."""
    import shutil
    import tempfile

    target = Path(root)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        build = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        build.chmod(0o777 & ~_umask())
        for relative, data in files.items():
            path = build / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if not target.exists():
            os.rename(build, target)
        elif _exchange(build, target):
            shutil.rmtree(build)  # now the old folder
        else:  # no atomic exchange here: two renames, with a window of microseconds between them
            old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=target.parent))
            os.rename(target, old / "old")
            os.rename(build, target)
            shutil.rmtree(old)
    except OSError as exc:
        shutil.rmtree(build, ignore_errors=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}; nothing was changed") from None
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return [target / relative for relative in files]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
