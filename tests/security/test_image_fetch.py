"""Task images as an attacker would reference and serve them, through the real API, worker and Redis.

Three kinds of server listen on separate loopback addresses: the stand-in Label Studio (127.0.0.1), an
internal service the backend must never reach (127.0.0.2) and an allowed image host (127.0.0.3, listed in
ALLOWED_IMAGE_HOSTS). Every hostile reference gets a 4xx from /predict; the internal service must receive no
request at all, and Label Studio's token must never go to a path of Label Studio's that is not storage. A
compressed answer that would inflate to gigabytes must not grow the worker, not even for a moment, and a
host that trickles bytes must not hold a request past IMAGE_FETCH_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.images import ImageLoader, ImageNotAllowed, ImageUnavailable
from backend.settings import Settings
from tests.support import wait_until
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio
from tests.support.images import png_bytes, scene
from tests.support.processes import backend_env, start_api, start_worker
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import interactive_body

FETCH_TIMEOUT_S = 3.0
PNG = png_bytes(scene())
T = TypeVar("T")


@dataclass
class Host:
    """A small HTTP server on one loopback address that records every request it gets."""

    address: str
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"


def _handler(host: Host) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            host.requests.append(self.path)
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif parts.path == "/bomb.png":
                body = _bomb()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "gzip, gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif parts.path == "/trickle.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                for byte in PNG:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
            elif parts.path == "/slow-headers.png":
                for char in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n":
                    self.wfile.write(bytes([char]))
                    self.wfile.flush()
                    time.sleep(0.3)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

    return Handler


@functools.cache
def _bomb() -> bytes:
    # A few kilobytes that inflate, twice, into hundreds of megabytes of zeros.
    return gzip.compress(gzip.compress(b"\0" * (256 * 1024 * 1024), compresslevel=9), compresslevel=9)


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that give up on the slow routes close the socket: that is the point


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    """(internal service on 127.0.0.2, allowed image host on 127.0.0.3), on one free port each."""
    started = []
    for address in ("127.0.0.2", "127.0.0.3"):
        host = Host(address)
        host.server = _Quiet((address, 0), _handler(host))
        threading.Thread(target=host.server.serve_forever, daemon=True).start()
        started.append(host)
    yield started[0], started[1]
    for host in started:
        assert host.server is not None
        host.server.shutdown()
        host.server.server_close()


@pytest.fixture(scope="module")
def guarded(base_env, hosts, fake_ls, tmp_path_factory):
    """An API and a worker whose images may come from Label Studio and the allowed host only."""
    _, allowed = hosts
    folder = tmp_path_factory.mktemp("guarded")
    env = backend_env(base_env, DATA_DIR=str(folder / "data"), ALLOWED_IMAGE_HOSTS=f"{allowed.address}:{allowed.port}",
                      IMAGE_FETCH_TIMEOUT=str(FETCH_TIMEOUT_S), JOB_RETRIES="0", INTERACTIVE_TIMEOUT="30",
                      REDIS_KEY_PREFIX=f"{KEY_PREFIX}-guarded")
    worker = start_worker(env, folder / "worker.log", f"{KEY_PREFIX}-guarded-worker")
    seen = len(fake_ls.requests)
    api = start_api(env, folder / "api.log")
    # At start the API looks for its webhook in Label Studio's API (with the token, as it should): let that
    # happen before the tests count where the token goes for image references.
    wait_until(lambda: any(path.startswith("/api/webhooks") for _, path, _ in fake_ls.requests[seen:]), 30,
               "the API's look for its webhook in Label Studio")
    yield api, worker
    api.stop()
    worker.stop()


def hostile_references(internal: Host, allowed: Host, ls: FakeLabelStudio) -> list[str]:
    ip = internal.address
    port = internal.port
    ls_port = urlsplit(ls.url).port
    return [
        f"/http://{ip}:{port}/x.png",  # a Label Studio "path" that is a URL
        f"http://{ip}:{port}/x.png",
        f"HTTP://{ip}:{port}/x.png",
        f"http://[::ffff:{ip}]:{port}/x.png",
        f"http://2130706434:{port}/x.png",  # 127.0.0.2 as one number
        f"http://0x7f000002:{port}/x.png",
        f"http://127.0.2:{port}/x.png",
        f"http://{allowed.address}:{allowed.port}@{ip}:{port}/x.png",  # user info
        f"http://{ip}:{port}\\@{allowed.address}:{allowed.port}/x.png",
        f"http://{ip}:{port}#@{allowed.address}:{allowed.port}/x.png",
        f"//{ip}:{port}/x.png",
        f"/\\{ip}:{port}/x.png",
        f"{allowed.base}/redirect?to=http://{ip}:{port}/x.png",  # an allowed host redirecting inwards
        f"{allowed.base}/redirect?to=/redirect?to=http://{ip}:{port}/x.png",
        f"{ls.url}/img/nothing?x=1#/data/upload/1/red.png",
        "/api/projects/",  # Label Studio's API with its token
        "/data/upload/../../api/projects/",
        "/data/upload/%2e%2e/%2e%2e/api/projects/",
        "/data/upload/..%2f..%2fapi/projects/",
        "upload/../api/projects/",
        "/storage-data/../api/projects/",
        f"{ls.url}/data/upload/../../api/projects/",
        f"http://127.0.0.1:{ls_port}/api/projects/",
        "/data/upload/1/red.png\x00.jpg",
        "file:///etc/passwd",
        f"gopher://{ip}:{port}/x",
        f"ftp://{ip}:{port}/x.png",
    ]


def predict(api: Any, reference: str) -> Any:
    return api.client.post("/predict", json=interactive_body(reference))


@pytest.mark.usefixtures("redis_db")
def test_no_hostile_reference_reaches_the_internal_service_or_spends_the_token(guarded, hosts, fake_ls):
    api, _ = guarded
    internal, allowed = hosts
    references = hostile_references(internal, allowed, fake_ls)
    assert len(references) >= 27
    before = len(fake_ls.requests)
    for reference in references:
        answer = predict(api, reference)
        assert 400 <= answer.status_code < 500, (reference, answer.status_code, answer.text)
    assert internal.requests == [], f"the internal service was reached: {internal.requests}"
    with_token = [(path, h.get("Authorization")) for _, path, h in fake_ls.requests[before:]
                  if h.get("Authorization") and not path.startswith(("/data/upload/", "/tasks/"))]
    assert with_token == [], f"the token went to non-storage paths: {with_token}"


@pytest.mark.usefixtures("redis_db")
def test_the_allowed_host_and_label_studio_storage_still_work(guarded, hosts, fake_ls):
    api, _ = guarded
    _, allowed = hosts
    assert predict(api, f"{allowed.base}/ok.png").status_code == 200
    assert predict(api, "/data/upload/1/red.png").status_code == 200
    assert predict(api, f"{fake_ls.url}/data/upload/1/blue.png").status_code == 200
    assert predict(api, f"{allowed.base}/redirect?to={allowed.base}/again.png").status_code == 200


def test_dns_rebinding_cannot_swap_the_checked_address(hosts, monkeypatch):
    """A name that resolves to a public address when checked and to the internal one when connecting: the
    connection goes to the checked address (so nowhere, here), never to a second answer."""
    internal, _ = hosts
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", internal.port))],
                    [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (internal.address, internal.port))]])
    real = socket.getaddrinfo

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "images.example":
            return next(answers)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    loader = ImageLoader(Settings(allowed_image_hosts=("*",), image_fetch_timeout=1.0))
    with pytest.raises(ImageUnavailable, match=r"images\.example"):
        loader.load(f"http://images.example:{internal.port}/x.png")
    assert internal.requests == []


def test_a_name_resolving_inwards_is_refused_before_connecting(hosts):
    internal, _ = hosts
    loader = ImageLoader(Settings(allowed_image_hosts=("*",)))
    with pytest.raises(ImageNotAllowed, match="non-public address"):
        loader.load(f"http://localhost:{internal.port}/x.png")
    assert internal.requests == []


@pytest.mark.usefixtures("redis_db")
def test_a_compression_bomb_is_refused_without_growing_the_worker(guarded, hosts):
    api, worker = guarded
    _, allowed = hosts
    answer, peak = peak_growth(worker.popen.pid, lambda: predict(api, f"{allowed.base}/bomb.png"))
    assert answer.status_code == 422 and "Content-Encoding" in answer.json()["detail"]
    assert peak < 50 * 1024 * 1024, f"the worker's memory peaked {peak / 2**20:.0f} MB above where it started"


def peak_growth(pid: int, action: Callable[[], T]) -> tuple[T, int]:
    """Run `action`; return its result and how far the resident memory of process `pid` rose above where it
    started, at its highest (the kernel's high-water mark, VmHWM), so that a spike freed before the answer
    still counts."""
    start = _proc_status_bytes(pid, "VmRSS")
    # Resets VmHWM to the current size: an older peak (loading the model) must not hide a new one. Where the
    # kernel refuses, the mark includes older peaks, so the growth can only be overstated, never hidden.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = action()
    return result, _proc_status_bytes(pid, "VmHWM") - start


def _proc_status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024  # the kernel writes kB
    raise AssertionError(f"/proc/{pid}/status has no {field}")


@pytest.mark.usefixtures("redis_db")
@pytest.mark.parametrize("route", ["/trickle.png", "/slow-headers.png"])
def test_a_trickling_host_is_cut_off_at_the_fetch_deadline(guarded, hosts, route):
    api, _ = guarded
    _, allowed = hosts
    started = time.monotonic()
    answer = predict(api, f"{allowed.base}{route}")
    elapsed = time.monotonic() - started
    assert answer.status_code == 422 and "IMAGE_FETCH_TIMEOUT" in answer.json()["detail"]
    # The whole fetch gets its budget, plus the job's own overhead; never a budget per byte.
    assert elapsed < FETCH_TIMEOUT_S + 4, f"held for {elapsed:.1f}s with IMAGE_FETCH_TIMEOUT={FETCH_TIMEOUT_S}"


def test_local_files_are_regular_files_under_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (root / "link.png").symlink_to("/etc/hostname")
    os.mkfifo(root / "pipe.png")
    loader = ImageLoader(Settings(local_files_document_root=str(root)))
    assert loader.load("/data/local-files/?d=a.png").size == (96, 64)
    for reference in ("/data/local-files/?d=link.png", "/data/local-files/?d=pipe.png",
                      "/data/local-files/?d=../../etc/passwd", "/data/local-files/?d=a.png%00.jpg"):
        with pytest.raises(ImageNotAllowed):
            loader.load(reference)


def test_only_the_token_kind_label_studio_accepts_reaches_storage(fake_ls):
    loader = ImageLoader(Settings(label_studio_url=fake_ls.url, label_studio_api_key=LS_TOKEN))
    assert loader.load("/data/upload/1/red.png").size == (96, 64)
    _, path, headers = fake_ls.requests[-1]
    assert path == "/data/upload/1/red.png" and headers["Authorization"] == f"Token {LS_TOKEN}"
    assert headers.get("Accept-Encoding") == "identity"
