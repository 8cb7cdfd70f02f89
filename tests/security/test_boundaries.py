"""Bounded inputs where the backend meets a deployment: request bodies that are deeply nested, not declared
as JSON, or carry an oversized labeling config; image references with non-ASCII characters, names that
cannot be resolved (or only slowly), another port of Label Studio's host, another project's uploads; and
secrets in Redis URLs. Each gets a 4xx or an image error that says what to change, never a 500."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backend import app as app_module
from backend.images import ImageLoader, ImageNotAllowed, ImageUnavailable, check_host
from backend.jobs import redacted
from backend.settings import Settings
from tests.support import REPO, capture, wait_until
from tests.support.images import png_bytes, scene
from tests.support.processes import backend_env, start_api
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, batch_body, batch_task, interactive_body

POST_ROUTES = ("/predict", "/setup", "/webhook", "/train")
NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def bounded(base_env, tmp_path_factory):
    """An API with a small labeling-config budget and no worker: nothing queued is ever taken."""
    folder = tmp_path_factory.mktemp("bounded")
    env = backend_env(base_env, DATA_DIR=str(folder / "data"), MAX_LABEL_CONFIG_BYTES="8000",
                      MAX_CONTROLS_PER_REGION="6", MAX_CANDIDATES_PER_REGION="12", INTERACTIVE_TIMEOUT="1",
                      BATCH_PREDICT_DEADLINE="1", REDIS_KEY_PREFIX=f"{KEY_PREFIX}-bounded")
    server = start_api(env, folder / "api.log")
    yield server
    server.stop()


def post_json(server: Any, route: str, body: bytes, content_type: str | None = "application/json") -> Any:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return server.client.post(route, content=body, headers=headers)


# ---------------------------------------------------------------------- request bodies
@pytest.mark.parametrize("route", POST_ROUTES)
def test_deeply_nested_json_is_refused_with_a_400(bounded, route):
    answer = post_json(bounded, route, NESTED)
    assert answer.status_code == 400, answer.text
    assert "nested" in answer.json()["detail"]
    assert bounded.client.get("/health").status_code == 200


def test_nesting_that_the_parser_survives_is_refused_too(bounded, fake_ls):
    # 500 levels parse, but would overflow the stack of whatever walks them next (copies, the job's JSON).
    body = batch_body([batch_task(1, f"{fake_ls.url}/img/red.png", "predictions")])
    deep: Any = "leaf"
    for _ in range(500):
        deep = {"d": deep}
    body["tasks"][0]["data"]["extra"] = deep
    answer = post_json(bounded, "/predict", json.dumps(body).encode())
    assert answer.status_code == 400 and "nested" in answer.json()["detail"]


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_post_bodies_must_be_declared_as_json(bounded, route, content_type):
    # A browser sends text/plain and form bodies across origins without asking first (no CORS preflight), so
    # without this check any web page a user opens could post to an API on their loopback.
    answer = post_json(bounded, route, b'{"action": "START_TRAINING"}', content_type)
    assert answer.status_code == 415, answer.text
    assert "Content-Type: application/json" in answer.json()["detail"]


def test_json_with_a_charset_is_json(bounded):
    answer = post_json(bounded, "/setup", json.dumps({"project": "1.1"}).encode(), "application/json; charset=utf-8")
    assert answer.status_code == 200, answer.text


def test_label_studio_declares_every_body_it_posts_as_json():
    """What makes the 415 safe for real traffic: the captured requests of Label Studio 1.23.2 (and of its
    webhooks), every one of them with a body, say application/json."""
    posted = 0
    for name in ("02", "04", "05", "06", "07", "08", "09", "10", "11", "12", "13", "14", "15"):
        request = capture(name)["request"]
        assert request["method"] == "POST"
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["content-type"].split(";")[0].strip() == "application/json", name
        posted += 1
    assert posted == 13


def test_request_bodies_are_parsed_off_the_event_loop(tmp_path, monkeypatch):
    """A 64 MB body takes a second to parse; on the event loop that second would stall /health for all."""
    on_loop: list[str] = []
    parse = app_module._parse_json

    def spying(raw: bytes) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # a worker thread: no event loop runs here
        else:
            on_loop.append(raw[:40].decode(errors="replace"))
        return parse(raw)

    monkeypatch.setattr(app_module, "_parse_json", spying)
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path, webhook_secret="s", label_studio_url="",
                        redis_url="redis://127.0.0.1:1/0", redis_socket_timeout=0.2)
    client = TestClient(app_module.create_app(settings), raise_server_exceptions=False)
    signed = {"X-Webhook-Secret": "s"}
    client.post("/setup", json={"project": "1.1"})
    client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=signed)
    client.post("/train", json={"action": "START_TRAINING"})
    client.post("/predict", json={"tasks": []})
    assert on_loop == []


# ---------------------------------------------------------------------- labeling configs
def test_a_labeling_config_past_its_byte_limit_is_refused(bounded, fake_ls):
    padded = CAPTURED_CONFIG.replace("</View>", "<!--" + "x" * 9000 + "--></View>", 1)
    for route, body in (("/setup", {"project": "1.1", "schema": padded}),
                        ("/predict", batch_body([batch_task(1, f"{fake_ls.url}/img/red.png", "predictions")],
                                                config=padded))):
        answer = bounded.client.post(route, json=body)
        assert answer.status_code == 413, answer.text
        assert "MAX_LABEL_CONFIG_BYTES=8000" in answer.json()["detail"]


def _with_choices(controls: int, values: int) -> str:
    extra = "".join(
        f'<Choices name="attr{c}" toName="image" perRegion="true">'
        + "".join(f'<Choice value="v{c}-{v}"/>' for v in range(values)) + "</Choices>"
        for c in range(controls))
    return CAPTURED_CONFIG.replace("</View>", extra + "</View>", 1)


def test_per_region_controls_and_candidates_are_bounded(bounded):
    many_controls = bounded.client.post("/setup", json={"project": "1.1", "schema": _with_choices(4, 1)})
    assert many_controls.status_code == 422 and "MAX_CONTROLS_PER_REGION=6" in many_controls.json()["detail"]
    many_values = bounded.client.post("/setup", json={"project": "1.1", "schema": _with_choices(2, 4)})
    assert many_values.status_code == 422 and "MAX_CANDIDATES_PER_REGION=12" in many_values.json()["detail"]
    assert bounded.client.post("/setup", json={"project": "1.1", "schema": _with_choices(1, 2)}).status_code == 200


# ---------------------------------------------------------------------- image references
def test_uploads_are_read_only_for_the_project_that_asks(bounded, fake_ls):
    # Label Studio keeps a project's uploads under /data/upload/<project id>/; the backend's token reads every
    # project's, so a request names only its own.
    body = interactive_body("/data/upload/2/secret.png")
    assert str(body["project"]).startswith("1.")
    answer = bounded.client.post("/predict", json=body)
    assert answer.status_code == 403, answer.text
    assert "project 2" in answer.json()["detail"] and "project 1" in answer.json()["detail"]
    for reference in ("upload/2/secret.png", f"{fake_ls.url}/data/upload/2/secret.png", "/data/upload/%32/x.png"):
        answer = bounded.client.post("/predict", json=interactive_body(reference))
        assert answer.status_code == 403, (reference, answer.text)


def test_a_non_ascii_image_url_is_percent_encoded(fake_ls):
    fake_ls.files["%C3%A9t%C3%A9.png"] = png_bytes(scene())
    loader = ImageLoader(Settings(label_studio_url=fake_ls.url, label_studio_api_key="test-legacy-token"))
    try:
        assert loader.load("/data/upload/1/été.png").size[0] > 0
        assert loader.load(f"{fake_ls.url}/data/upload/1/été.png").size[0] > 0
        with pytest.raises(ImageUnavailable, match="404"):
            loader.load(f"{fake_ls.url}/img/ça-n'existe-pas.png")
    finally:
        loader.close()


@pytest.mark.usefixtures("worker", "redis_db")
def test_a_non_ascii_image_url_is_never_a_500(api, fake_ls):
    answer = api.client.post("/predict", json=interactive_body(f"{fake_ls.url}/data/upload/1/ünknown.png"))
    assert 400 <= answer.status_code < 500, answer.text
    assert "404" in answer.json()["detail"]


@pytest.mark.parametrize("reference", [
    "http://" + "a" * 64 + ".example/x.png",  # a DNS label past 63 characters: the idna codec raises
    "http://exa\u0301mple.invalid/x.png",
    "http://[fe80::1%25eth0]:1/x.png",
])
def test_any_fetch_error_is_an_image_error(reference):
    loader = ImageLoader(Settings(allowed_image_hosts=("*",), image_fetch_timeout=2.0))
    try:
        with pytest.raises((ImageUnavailable, ImageNotAllowed)):
            loader.load(reference)
    finally:
        loader.close()


def test_name_resolution_is_inside_the_fetch_deadline(monkeypatch):
    real = socket.getaddrinfo

    def slow(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example":
            time.sleep(6)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    loader = ImageLoader(Settings(allowed_image_hosts=("*",), image_fetch_timeout=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(ImageUnavailable, match="IMAGE_FETCH_TIMEOUT=1s"):
            loader.load("http://slow.example/x.png")
    finally:
        loader.close()
    assert time.monotonic() - started < 2.5


def test_label_studio_url_without_a_port_allows_only_its_scheme_port():
    plain = Settings(label_studio_url="http://ls.example")
    check_host("http://ls.example/data/x.png", plain.image_hosts)
    check_host("http://ls.example:80/data/x.png", plain.image_hosts)
    for other in ("http://ls.example:6379/", "http://ls.example:8080/x.png", "https://ls.example/x.png"):
        with pytest.raises(ImageNotAllowed, match="ALLOWED_IMAGE_HOSTS"):
            check_host(other, plain.image_hosts)
    secure = Settings(label_studio_url="https://ls.example")
    check_host("https://ls.example/x.png", secure.image_hosts)
    with pytest.raises(ImageNotAllowed):
        check_host("http://ls.example:6379/", secure.image_hosts)
    assert Settings(label_studio_url="http://ls.example:8080").image_hosts == ("ls.example:8080",)


# ---------------------------------------------------------------------- secrets
def test_redis_passwords_never_reach_messages():
    assert "s3cret" not in redacted("redis://127.0.0.1:6379/0?password=s3cret")
    assert "s3cret" not in redacted("redis://127.0.0.1:6379/0?db=1&PassWord=s3cret")
    assert "s3cret" not in redacted("unix:///run/redis.sock?password=s3cret&db=2")
    assert "s3cret" not in redacted("redis://user:s3cret@127.0.0.1:6379/0")
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert "s3cret" not in repr(Settings(redis_url="redis://:s3cret@redis:6379/0"))


def test_the_api_keeps_answering_after_refusals(bounded):
    for _ in range(3):
        post_json(bounded, "/predict", NESTED)
    wait_until(lambda: bounded.client.get("/health").status_code == 200, 5, "/health")


# ---------------------------------------------------------------------- deployment
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_an_api_answering_other_machines_without_basic_auth_refuses_to_start(base_env, host):
    env = backend_env(base_env, HOST=host, PORT="1")
    done = subprocess.run([sys.executable, "-m", "backend", "serve-api"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert f"HOST={host}" in line and "BASIC_AUTH_USER" in line and "BASIC_AUTH_PASS" in line


def test_loopback_hosts_answer_this_machine_only():
    assert all(Settings(host=h).answers_this_machine_only for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(Settings(host=h).answers_this_machine_only for h in ("0.0.0.0", "::", "10.0.0.1", "backend"))


# ---------------------------------------------------------------------- reports
def test_strings_from_webhooks_are_plotted_as_plain_text(tmp_path):
    # A proposal's model version and a config's control names arrive with webhooks; matplotlib would read
    # `$…$` in them as math (and fail on a broken formula), and a long one would squeeze the figure.
    from backend.acceptance import AcceptanceStats
    from backend.report import plot_acceptance

    stats = AcceptanceStats(regions=2, accepted=1, fields={"$\\frac{": [1, 2], "x" * 5000: [2, 2]})
    path = plot_acceptance({"v1$^{": stats, "$\\undefined$" + "y" * 5000: stats}, ["v1$^{"], tmp_path / "a.png")
    assert path.stat().st_size > 0
