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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cdka_search.errors import SweepError
from cdka_search.fileio import user_path

DEFAULT_STORAGE = "sqlite:///cdka-sweep.db"
HEARTBEAT_S = 10
GRACE_S = 30
SQLITE_TIMEOUT_S = 60
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_JOURNAL_SUFFIXES = (".journal", ".log")
# What a worker sees when another one is creating the schema of the same new database at that moment.
_SCHEMA_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")


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
        return text
    if text.endswith(_JOURNAL_SUFFIXES):
        return "journal:" + str(user_path(text, SweepError, "--storage"))
    if text.endswith(_SQLITE_SUFFIXES):
        return "sqlite:///" + str(user_path(text, SweepError, "--storage"))
    raise SweepError(
        f"--storage {text!r} is not understood; use an Optuna RDB URL (sqlite:///sweep.db, "
        "postgresql://user@127.0.0.1/cdka), journal:FILE, or a file ending in .db or .journal"
    )


def open_storage(storage: str | None, *, heartbeat: bool = True) -> Any:
    """An Optuna storage object for ``storage``; SweepError (one line) when it cannot be opened."""
    import optuna

    url = normalise(storage)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if not path.parent.is_dir():
            raise SweepError(f"journal storage {path}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        except (OSError, ValueError) as exc:
            raise SweepError(f"journal storage {path}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        file = url.split(":///", 1)[-1]
        if file and file != ":memory:" and not user_path(file, SweepError, "--storage").parent.is_dir():
            raise SweepError(f"storage {url}: folder {Path(file).parent} does not exist")
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


def _rdb(url: str, **kwargs: Any) -> Any:
    import time

    import optuna

    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(driver_url(url), **kwargs)
        except ImportError as exc:
            raise SweepError(
                f"storage {redact(url)}: a database driver is missing ({exc}); e.g. pip install psycopg2-binary"
            ) from None
        except Exception as exc:  # sqlalchemy errors: one line, no traceback
            # Several workers creating the schema of a new database at once: one wins, the others retry.
            if any(m in str(exc) for m in _SCHEMA_RACE) and attempt < 3:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise SweepError(f"cannot open storage {redact(url)}: {redact(first)[:300]}") from None
    raise AssertionError("unreachable")
