"""Session fixtures for end-to-end tests: a real Label Studio server, its API client, an image server, and a
headless Chromium for checks of the labeling UI.

Under CI (the ``CI`` environment variable set) a Label Studio that cannot be installed or started, or a
browser that cannot be launched, fails the tests; elsewhere a failed install or a missing browser skips
them with the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

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

if TYPE_CHECKING:
    from playwright.sync_api import Browser

E2E_DIR = Path(__file__).resolve().parent
# Playwright's own browser builds cannot be downloaded where the tests run: they use an installed Chromium.
CHROMIUM_ENV = "GPT4ROI_CHROMIUM"
# Without the background-networking switches Chromium waits on connections that this network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS_ENV = "GPT4ROI_E2E_ARTIFACTS"

# Filled by the fixtures, printed in the terminal summary so that CI logs show where time went.
_timings: dict[str, float] = {}
_servers: list[LabelStudioServer] = []
_artifacts: list[Path] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _unavailable(problem: str) -> NoReturn:
    if _in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem + " (with CI set this is a failure)")


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
    _unavailable(problem)


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


def chromium_path() -> str | None:
    """The Chromium executable: ``GPT4ROI_CHROMIUM`` (a path or a command), else ``chromium`` on PATH."""
    return shutil.which(os.environ.get(CHROMIUM_ENV) or "chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """A headless Chromium driven by Playwright, closed at the end of the session."""
    executable = chromium_path()
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        _unavailable(f"the playwright package is not installed ({exc}); pip install -r requirements.txt")
    if executable is None:
        _unavailable("no Chromium: apt-get install chromium, or point GPT4ROI_CHROMIUM at one")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as exc:
            _unavailable(f"Chromium at {executable} did not start: {exc}")
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Artifacts:
    """Files the tests leave for people to look at, listed at the end of the run."""

    directory: Path | None
    kept: list[Path] = field(default_factory=list)

    def keep(self, path: Path) -> Path:
        """Copy ``path`` into the artifacts directory when one is configured; return where it stays."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.copy2(path, self.directory / path.name))
        self.kept.append(path)
        return path


@pytest.fixture(scope="session")
def artifacts() -> Artifacts:
    """Screenshots and the like: copied to ``GPT4ROI_E2E_ARTIFACTS`` when set, else left where the test wrote
    them (below pytest's temporary directory)."""
    configured = os.environ.get(ARTIFACTS_ENV)
    return Artifacts(Path(configured) if configured else None, _artifacts)


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
    """Print how long Label Studio took to install and start, and where the artifacts are."""
    if _timings:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in _timings.items())
        terminalreporter.write_line(f"Label Studio: {parts}")
    for path in _artifacts:
        terminalreporter.write_line(f"e2e artifact: {path}")
