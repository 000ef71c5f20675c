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

import errno
import os
import stat
from pathlib import Path

from cdka_search.documents import brief
from cdka_search.errors import CdkaError, OutputError

NAME_MAX, PATH_MAX = 255, 4096  # bytes, Linux's limits: beyond them every call on the path fails with ENAMETOOLONG


def check_path(path: str | os.PathLike[str], error: type[CdkaError], what: str = "path") -> Path:
    """``path`` as a Path, or ``error`` (one line) where the system could not name it: a part longer
    than NAME_MAX bytes, the whole longer than PATH_MAX, or a NUL byte. Checked where a path enters,
    since pathlib's ``exists()`` and ``is_dir()`` raise on such a path instead of answering."""
    text = os.fspath(path)
    encoded = os.fsencode(text)
    if b"\0" in encoded:
        raise error(f"{what} {brief(text)}: contains a NUL byte")
    if len(encoded) >= PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise error(f"{what} {brief(text)}: longer than this system allows ({NAME_MAX} bytes a name, {PATH_MAX - 1:,} in all)")
    return Path(text)


def absent(path: str | os.PathLike[str], what: str = "file or folder") -> str:
    """Why ``path``, which does not exist, cannot be read: a link that leads nowhere (to a missing
    file, or round a loop) says so, rather than "no such file", which its name in a listing belies."""
    try:
        link = os.path.islink(path)
    except (OSError, ValueError):
        link = False
    return "a link that leads to nothing (a missing file or a loop)" if link else f"no such {what}"


def user_path(text: str, error: type[CdkaError], what: str = "path") -> Path:
    """``text`` as a Path with ``~`` expanded; ``error`` (one line) where it cannot be: ``~user`` of no
    such user, or no home directory (pathlib raises RuntimeError there), or a name the system cannot take."""
    try:
        return check_path(Path(check_path(text, error, what)).expanduser(), error, what)
    except RuntimeError:
        raise error(f"{what} {brief(text)}: cannot expand '~' (no such user or no home directory)") from None


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


FIFO_WAIT = 10.0  # seconds a FIFO may go without a reader before writing to it fails


def _open_fifo(target: Path) -> int:
    """A FIFO opened for writing once a reader has it open: polled without blocking, so that a FIFO
    nobody reads is an error after FIFO_WAIT seconds, not a hang."""
    import time

    deadline = time.monotonic() + FIFO_WAIT
    while True:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            os.set_blocking(fd, True)
            return fd


def _write_through(target: Path, data: bytes, mode: int) -> Path:
    try:
        with os.fdopen(_open_fifo(target), "wb") if stat.S_ISFIFO(mode) else target.open("wb") as fh:
            fh.write(data)
    except OSError as exc:
        reason = f"a FIFO that nothing read for {FIFO_WAIT:g} s" if exc.errno == errno.ENXIO else exc.strerror or exc
        raise OutputError(f"cannot write {target}: {reason}") from None
    return target


def _a_folder(path: Path) -> OutputError:
    return OutputError(f"{path} is a folder; give a file name")


def check_output(path: str | os.PathLike[str]) -> None:
    """OutputError when ``path`` is an existing folder: what the final write refuses, refused before
    the seconds of work whose result it would hold."""
    if Path(path).is_dir():
        raise _a_folder(Path(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path``: atomically for regular files, straight through for special ones."""
    target = check_path(path, OutputError)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a link loop, a path through a file, no permission
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise _a_folder(target)
    if mode is not None and not stat.S_ISREG(mode):
        return _write_through(target, data, mode)
    if target.is_symlink():
        # Replace the file the link points to and keep the link; a link to a missing folder is refused
        # rather than creating folders wherever the link points.
        linked = Path(os.path.realpath(target))
        if mode is None and not linked.parent.is_dir():
            raise OutputError(f"cannot write {target}: a link to {linked}, whose folder does not exist")
        target = linked
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
