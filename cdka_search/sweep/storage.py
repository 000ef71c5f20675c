"""Optuna storages from one string: an RDB URL, a SQLite file, or a journal file.

- ``sqlite:///cdka-sweep.db`` (the default), ``postgresql://user@host/db``, ``mysql+pymysql://...``:
  Optuna's RDBStorage. Trials send a heartbeat every HEARTBEAT_S seconds; a trial whose process died
  (SIGKILL, a lost machine) is marked FAIL once its heartbeat is GRACE_S seconds old and is then
  enqueued again with the same parameters, so no design of the space is lost. SQLite waits up to
  SQLITE_TIMEOUT_S seconds for a lock, so a few processes can share one file.
- ``journal:PATH`` or a path ending in ``.journal`` / ``.log``: Optuna's JournalStorage on a file
  (append-only log with a file lock; works on a shared NFS folder across machines). Journal storages
  have no heartbeat: a killed process's running trial stays RUNNING (it is never counted as finished).
- a path ending in ``.db`` / ``.sqlite`` / ``.sqlite3``: shorthand for ``sqlite:///PATH``.

A leading ``~`` in any of these files (``sqlite:///~/sweep.db``, ``journal:~/s.journal``) is the home folder.

Refused with one line (SweepError): an in-memory SQLite database, a storage file that exists but is
not a regular file (a folder, FIFO or device, or a link to one), and a journal Optuna cannot replay.
What a study holds is checked as it is read (cdka_search.sweep.stored).
"""

from __future__ import annotations

import contextlib
import re
import stat
from pathlib import Path
from typing import Any

from cdka_search.documents import brief
from cdka_search.errors import SweepError
from cdka_search.fileio import check_path, user_path

DEFAULT_STORAGE = "sqlite:///cdka-sweep.db"
HEARTBEAT_S = 10
GRACE_S = 30
SQLITE_TIMEOUT_S = 60
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_JOURNAL_SUFFIXES = (".journal", ".log")
# What a worker sees when another one is creating the schema of the same new database at that moment.
_SCHEMA_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")
# What Optuna raises on stored content it cannot decode: a journal line it cannot replay (a missing field, an
# unknown op_code, a value of the wrong type or range, a line that is not JSON), or a database row it cannot
# read back (a choice index out of range, an unknown state, an attribute that is not JSON). Caught around
# opening a journal and around reading a study (cdka_search.sweep.stored) alone.
READ_ERRORS = (LookupError, TypeError, ValueError, AttributeError, AssertionError, RecursionError)
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and stored attributes."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def normalise(storage: str | None) -> str:
    """The canonical form of a storage string: an RDB URL or ``journal:PATH``."""
    text = (storage or DEFAULT_STORAGE).strip()
    if not text:
        raise SweepError("--storage is empty; use sqlite:///FILE.db, postgresql://..., or journal:FILE")
    if text.startswith("journal:"):
        return "journal:" + str(user_path(text[len("journal:"):], SweepError, "--storage"))
    if "://" in text:
        return _sqlite_home(text) if text.startswith("sqlite") else text
    if text.endswith(_JOURNAL_SUFFIXES):
        return "journal:" + str(user_path(text, SweepError, "--storage"))
    if text.endswith(_SQLITE_SUFFIXES):
        return "sqlite:///" + str(user_path(text, SweepError, "--storage"))
    raise SweepError(
        f"--storage {text!r} is not understood; use an Optuna RDB URL (sqlite:///sweep.db, "
        "postgresql://user@127.0.0.1/cdka), journal:FILE, or a file ending in .db or .journal"
    )


def _sqlite_database(url: str) -> str:
    """The database file of a SQLite URL, as SQLAlchemy reads it. An in-memory database is refused: it
    dies with the process, so nothing could resume, join or report the study its plan would name."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise SweepError(f"--storage {brief(redact(url))} is not a valid database URL") from None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:") or parsed.query.get("mode") == "memory":
        raise SweepError(
            f"--storage {brief(redact(url))} is an in-memory database, which cannot be resumed, shared or "
            "reported; give a file, e.g. sqlite:///cdka-sweep.db"
        )
    return database


def _sqlite_home(url: str) -> str:
    """A SQLite URL with ``~`` in its file expanded, as in every other path option (SQLite itself
    would look for a folder named ``~``)."""
    database = _sqlite_database(url)
    if not database.startswith("~"):
        return url
    from sqlalchemy.engine import make_url

    home = str(user_path(database, SweepError, "--storage"))
    return make_url(url).set(database=home).render_as_string(hide_password=False)


def storage_file(url: str) -> Path | None:
    """The file a normalised storage lives in (a journal or a SQLite database); None for a server."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    if url.startswith("sqlite"):
        return check_path(_sqlite_database(url), SweepError, "--storage")
    return None


def _check_storage_file(path: Path, url: str) -> None:
    """Refuse, before Optuna opens ``path``, a missing folder and anything but a regular file: a journal
    on /dev/zero or a FIFO is read forever, a folder fails deep inside the driver."""
    if not path.parent.is_dir():
        raise SweepError(f"--storage {redact(url)}: folder {path.parent} does not exist")
    try:
        found = path.stat()
    except FileNotFoundError:
        return  # a new storage: Optuna creates the file
    except OSError as exc:
        raise SweepError(f"--storage {redact(url)}: cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(found.st_mode):
        if url.startswith("sqlite") and found.st_size:
            _check_not_foreign(path, url)
        return
    kind = next((name for test, name in _NOT_REGULAR if test(found.st_mode)), "a special file")
    what = "links to" if path.is_symlink() else "is"
    raise SweepError(f"--storage {redact(url)}: {path} {what} {kind}, not a regular file; give a file path")


def _check_not_foreign(path: Path, url: str) -> None:
    """Refuse a SQLite database that holds tables but not Optuna's: Optuna would add its 13 tables to
    another program's file (or fail halfway on a table name they share). Optuna creates its schema
    in one transaction, so a database a sweep started holds ``studies`` and ``version_info`` or nothing."""
    import sqlite3
    from urllib.request import pathname2url

    try:
        with contextlib.closing(sqlite3.connect(f"file:{pathname2url(str(path.resolve()))}?mode=ro", uri=True, timeout=1)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return  # not a database, or locked by a writer: Optuna's own open reports the former
    if tables and not tables & {"studies", "version_info"}:
        shown = ", ".join(brief(t) for t in sorted(tables)[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise SweepError(
            f"--storage {redact(url)}: {path} is a SQLite database of another program (its tables: {shown}), not a sweep's; "
            "give a new file, or one a sweep wrote"
        )


def open_storage(storage: str | None, *, heartbeat: bool = True) -> Any:
    """An Optuna storage object for ``storage``; SweepError (one line) when it cannot be opened."""
    import optuna

    url = normalise(storage)
    file = storage_file(url)
    if file is not None:
        _check_storage_file(file, url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(file)
        try:
            # JournalStorage replays the whole file as it is built: this is where bad content shows.
            return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        except OSError as exc:
            raise SweepError(f"journal storage {path}: {exc.strerror or exc}") from None
        except READ_ERRORS as exc:
            raise SweepError(
                f"journal storage {path}: not a valid Optuna journal (replaying it raised {exc.__class__.__name__}); "
                "check the path, or move the file away to start a new study"
            ) from None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat:
        import optuna.storages as storages

        kwargs.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            retry = storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
            return _rdb(url, heartbeat_stale_trial_callback=retry, **kwargs)
        return _rdb(url, failed_trial_callback=storages.RetryFailedTrialCallback(max_retry=2), **kwargs)
    return _rdb(url, **kwargs)


def driver_url(url: str) -> str:
    """Pick an installed PostgreSQL driver: SQLAlchemy 2.1 maps postgresql:// to psycopg (3), while
    many installs (and cdka[test]) have psycopg2; ``postgres://`` is accepted as ``postgresql://``."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return f"postgresql{sep}{rest}"


#: The package of each database's usual SQLAlchemy driver, by URL scheme (before any "+driver").
_DRIVERS = {"postgresql": "psycopg2-binary", "postgres": "psycopg2-binary", "mysql": "mysqlclient", "mariadb": "mysqlclient",
            "mssql": "pyodbc", "oracle": "cx_Oracle"}


def _driver_hint(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)
    if len(scheme) == 2:  # the URL names its driver: that module is what failed to import
        return f"install the package that provides SQLAlchemy's {scheme[1]!r} driver"
    package = _DRIVERS.get(scheme[0].lower())
    return f"e.g. pip install {package}" if package else "install the database's SQLAlchemy driver"


def _rdb(url: str, **kwargs: Any) -> Any:
    import time

    import optuna

    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(driver_url(url), **kwargs)
        except ImportError as exc:
            raise SweepError(f"storage {redact(url)}: a database driver is missing ({exc}); {_driver_hint(url)}") from None
        except Exception as exc:  # sqlalchemy errors: one line, no traceback
            # Several workers creating the schema of a new database at once: one wins, the others retry.
            if any(m in str(exc) for m in _SCHEMA_RACE) and attempt < 3:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise SweepError(f"cannot open storage {redact(url)}: {redact(first)[:300]}") from None
    raise AssertionError("unreachable")
