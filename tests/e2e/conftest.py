"""Session fixtures for end-to-end tests: a real Label Studio server, its API client, and an image server.

Under CI (the ``CI`` environment variable set) a Label Studio that cannot be installed or started fails
the tests; elsewhere a failed install skips them with the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .labelstudio import (
    ImageServer,
    LabelStudioClient,
    LabelStudioServer,
    LabelStudioStartError,
    LabelStudioUnavailable,
    ensure_labelstudio,
    fresh_data_dir,
    read_log_tail,
)

E2E_DIR = Path(__file__).resolve().parent

# Filled by the fixtures, printed in the terminal summary so that CI logs show where time went.
_timings: dict[str, float] = {}
_servers: list[LabelStudioServer] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test below tests/e2e is an e2e test, whether or not it says so itself."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def labelstudio_venv() -> Path:
    """The Label Studio venv, installed by scripts/ensure_labelstudio.sh when missing."""
    started = time.monotonic()
    try:
        venv = ensure_labelstudio()
    except LabelStudioUnavailable as exc:
        problem = f"Label Studio could not be installed: {exc}"
    else:
        _timings["venv ready"] = time.monotonic() - started
        return venv
    if _in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem + " (with CI set this is a failure)")


@pytest.fixture(scope="session")
def labelstudio(labelstudio_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A running Label Studio on a free loopback port, with fresh data, stopped at the end of the session."""
    workdir = tmp_path_factory.mktemp("labelstudio")
    log_path = workdir / "labelstudio.log"
    started = time.monotonic()
    try:
        credentials = fresh_data_dir(labelstudio_venv, workdir / "data")
        _timings["pristine data ready"] = time.monotonic() - started
        server = LabelStudioServer(venv=labelstudio_venv, data_dir=workdir / "data", log_path=log_path,
                                   credentials=credentials)
        _timings["server start"] = server.start()
    except LabelStudioStartError as exc:
        problem = f"Label Studio did not start: {exc}"
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    _servers.append(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls_client(labelstudio: LabelStudioServer) -> Iterator[LabelStudioClient]:
    """An API client authenticated with the server user's legacy token."""
    with labelstudio.client() as client:
        yield client


@pytest.fixture(scope="session")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    """Serves files written below ``image_server.root`` over HTTP on 127.0.0.1."""
    with ImageServer(tmp_path_factory.mktemp("images")) as server:
        yield server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Attach the Label Studio log (path and tail) to every failed test that used the server."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "labelstudio" in getattr(item, "fixturenames", ()):
        for server in _servers:
            report.sections.append(
                ("Label Studio log", f"{server.log_path}\n{read_log_tail(server.log_path, 60)}"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how long Label Studio took to install and start."""
    if _timings:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in _timings.items())
        terminalreporter.write_line(f"Label Studio: {parts}")
