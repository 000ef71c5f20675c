"""Shared fixtures: a fixed console width, single-threaded BLAS, and a CLI runner."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["COLUMNS"] = "160"  # wrapped table lines would break substring assertions

import pytest
from typer.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner):
    """Invoke `cdka ARGS...`; returns the click Result (stdout, stderr, exit_code)."""
    from cdka_search.cli.app import app

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke
