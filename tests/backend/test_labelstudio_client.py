"""Both kinds of Label Studio token work for every call the backend makes: legacy tokens as they are,
personal access tokens exchanged for access tokens, cached, shared by the API client and the image fetcher,
and refreshed once on a 401 (a batch push and an image download alike). And what `connect` says when Label
Studio refuses to call a backend on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from backend.__main__ import main
from backend.images import ImageLoader, ImageUnavailable
from backend.labelconfig import FillPlan, regions_from_task
from backend.labelstudio import (
    REFRESH_MARGIN_S,
    LabelStudioClient,
    LabelStudioCredentials,
    LabelStudioError,
    TokenKind,
    token_kind,
)
from backend.payloads import make_payload
from backend.settings import Settings
from tests.support.fake_labelstudio import BLOCKED_DETAIL, LS_TOKEN, FakeLabelStudio, jwt, personal_access_token
from tests.support.model_factory import MODEL_VERSION
from tests.support.requests import CAPTURED_CONFIG, batch_task, check_prediction


def settings_for(fake_ls: FakeLabelStudio, key: str) -> Settings:
    return Settings(label_studio_url=fake_ls.url, label_studio_api_key=key)


@pytest.fixture
def pat_only(fake_ls):
    """The stand-in Label Studio with legacy tokens disabled for the organization, as a stock one."""
    fake_ls.legacy_tokens_enabled = False
    yield fake_ls
    fake_ls.legacy_tokens_enabled = True


def test_token_kinds_are_told_apart():
    assert token_kind(LS_TOKEN) is TokenKind.LEGACY
    assert token_kind(personal_access_token()) is TokenKind.PERSONAL
    assert token_kind(jwt({"token_type": "access", "exp": 1})) is TokenKind.ACCESS
    assert token_kind("a.b.c") is TokenKind.LEGACY  # three parts, but no JWT in them


def test_a_legacy_token_is_sent_as_it_is(fake_ls):
    assert LabelStudioCredentials(fake_ls.url, LS_TOKEN).header() == f"Token {LS_TOKEN}"


def test_a_personal_access_token_is_exchanged_once_and_the_access_token_reused(pat_only):
    credentials = LabelStudioCredentials(pat_only.url, pat_only.personal_token)
    before = pat_only.refreshes
    first = credentials.header()
    assert first.startswith("Bearer ") and first.removeprefix("Bearer ") in pat_only.access_tokens
    assert credentials.header() == first and pat_only.refreshes == before + 1


def test_an_access_token_about_to_expire_is_refreshed_before_it_is_sent(pat_only):
    credentials = LabelStudioCredentials(pat_only.url, pat_only.personal_token)
    first = credentials.header()
    credentials._expires_at = time.time() + REFRESH_MARGIN_S / 2
    assert credentials.header() != first


def test_uploaded_images_download_with_a_personal_access_token(pat_only):
    loader = ImageLoader(settings_for(pat_only, pat_only.personal_token))
    assert loader.load("/data/upload/1/red.png").size == (96, 64)
    _, path, headers = pat_only.requests[-1]
    assert path == "/data/upload/1/red.png" and headers["Authorization"].startswith("Bearer ")


def test_an_expired_access_token_is_refreshed_once_and_the_image_downloads(pat_only):
    loader = ImageLoader(settings_for(pat_only, pat_only.personal_token))
    loader.load("/data/upload/1/red.png")
    refreshes = pat_only.refreshes
    pat_only.expire_access_tokens()
    assert loader.load("/data/upload/1/blue.png").getpixel((60, 30)) == (20, 40, 220)
    assert pat_only.refreshes == refreshes + 1
    _, path, headers = pat_only.requests[-1]
    assert path == "/data/upload/1/blue.png" and headers["Authorization"].removeprefix("Bearer ") in (
        pat_only.access_tokens)


def test_an_expired_access_token_is_refreshed_once_for_a_cloud_image_too(pat_only):
    loader = ImageLoader(settings_for(pat_only, pat_only.personal_token))
    loader.load("/data/upload/1/red.png")
    refreshes = pat_only.refreshes
    pat_only.expire_access_tokens()
    assert loader.load("s3://bucket/blue.png", task_id=15).size == (96, 64)
    assert pat_only.refreshes == refreshes + 1


def test_an_image_download_whose_token_exchange_fails_says_what_to_do(pat_only):
    loader = ImageLoader(settings_for(pat_only, personal_access_token()))  # revoked, or from elsewhere
    with pytest.raises(ImageUnavailable, match=r"red\.png: .*no access token.*Personal Access Token"):
        loader.load("/data/upload/1/red.png")


def test_the_image_fetcher_and_the_api_client_share_one_access_token(pat_only):
    settings = settings_for(pat_only, pat_only.personal_token)
    pat_only.add_project(806, CAPTURED_CONFIG, [])
    ImageLoader(settings).load("/data/upload/1/red.png")
    refreshes = pat_only.refreshes
    with LabelStudioClient(settings) as client:
        assert client.project(806)["id"] == 806
    assert pat_only.refreshes == refreshes  # no exchange of its own


def test_the_legacy_token_fails_where_the_organization_disabled_it(pat_only):
    with pytest.raises(LabelStudioError, match="legacy"):
        LabelStudioClient(settings_for(pat_only, LS_TOKEN)).project(1)


def test_a_401_refreshes_the_access_token_once_and_the_call_goes_through(pat_only):
    pat_only.add_project(801, CAPTURED_CONFIG, [{"id": 8010, "data": {"image": "/data/upload/1/red.png"}}])
    client = LabelStudioClient(settings_for(pat_only, pat_only.personal_token))
    assert client.project(801)["label_config"] == CAPTURED_CONFIG
    refreshes = pat_only.refreshes
    pat_only.expire_access_tokens()  # what Label Studio does after five minutes
    client.create_prediction(8010, [], 0.5, "v1")
    assert pat_only.refreshes == refreshes + 1
    assert [p["task"] for p in pat_only.predictions_for(801)] == [8010]


def test_a_revoked_personal_access_token_says_what_to_do(pat_only):
    client = LabelStudioClient(settings_for(pat_only, personal_access_token()))
    with pytest.raises(LabelStudioError, match="Personal Access Token"):
        client.project(1)


def test_without_credentials_the_client_names_the_settings():
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        LabelStudioClient(Settings())


def test_tasks_are_read_page_by_page(fake_ls):
    tasks = [{"id": 9000 + i, "data": {"image": "/data/upload/1/red.png"}} for i in range(230)]
    fake_ls.add_project(802, CAPTURED_CONFIG, tasks)
    client = LabelStudioClient(settings_for(fake_ls, LS_TOKEN))
    assert [t["id"] for t in client.tasks(802)] == [t["id"] for t in tasks]


# ---------------------------------------------------------------------- a batch push
def prelabel_payload(task: dict[str, Any], project: int) -> dict[str, Any]:
    """The job payload `python -m backend prelabel` makes for a task."""
    plan = FillPlan.from_label_config(CAPTURED_CONFIG)
    return make_payload(task_id=task["id"], project=str(project), image=plan.image_reference(task), plan=plan,
                        regions=regions_from_task(plan, task), label_config=CAPTURED_CONFIG,
                        model_version=MODEL_VERSION, keep_drawn_label=True, max_new_tokens=6)


def test_an_access_token_expiring_in_the_middle_of_a_batch_push_is_refreshed_and_the_push_completes(
        pat_only, model_dir: Path, tmp_path: Path):
    from backend.worker import Predictor

    project = 804
    tasks = [batch_task(8040 + i, f"/data/upload/1/{'red' if i % 2 else 'blue'}.png", "predictions")
             for i in range(5)]
    pat_only.add_project(project, CAPTURED_CONFIG, tasks)
    predictor = Predictor(Settings(model_dir=model_dir, data_dir=tmp_path, device="cpu",
                                   label_studio_url=pat_only.url, label_studio_api_key=pat_only.personal_token))
    payloads = [prelabel_payload(task, project) for task in tasks]
    outputs = predictor.run_many(payloads)  # one batch, as a worker answers the jobs waiting together

    pat_only.expire_access_tokens_after_predictions(2)
    sent_before = len(pat_only.requests)
    for payload, output in zip(payloads, outputs, strict=True):
        assert predictor.push(payload, output)  # each job pushes its own prediction, as the worker does

    pushed = pat_only.predictions_for(project)
    assert [p["task"] for p in pushed] == [t["id"] for t in tasks]
    for prediction in pushed:
        check_prediction(prediction)
    assert pat_only.refreshes_at_expiry is not None and pat_only.refreshes == pat_only.refreshes_at_expiry + 1
    # The third push was refused once and sent again with the fresh token.
    posts = [path for method, path, _ in pat_only.requests[sent_before:] if method == "POST"]
    assert posts.count("/api/predictions/") == len(tasks) + 1


# ---------------------------------------------------------------------- connect
def test_connect_tells_how_to_let_a_stock_label_studio_call_a_backend_on_loopback(
        pat_only, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    pat_only.add_project(805, CAPTURED_CONFIG, [])
    models = tmp_path / "models"
    models.mkdir()
    (models / "current").write_text(MODEL_VERSION + "\n")
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"LABEL_STUDIO_URL": pat_only.url, "LABEL_STUDIO_API_KEY": pat_only.personal_token,
                        "BACKEND_URL": "http://127.0.0.1:9090", "MODEL_DIR": str(models),
                        "DATA_DIR": str(tmp_path / "data"), "WEBHOOK_SECRET": "s3cret"}.items():
        monkeypatch.setenv(name, value)

    assert main(["connect", "--project", "805"]) == 1
    printed = capsys.readouterr().out
    fix = ("a stock Label Studio calls no ML backend or webhook on a loopback or private network. Start Label "
           "Studio with ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false (or set BACKEND_URL to a public "
           "address of this backend)")
    assert (f"[failed] ML backend http://127.0.0.1:9090: Label Studio refuses http://127.0.0.1:9090 "
            f"({BLOCKED_DETAIL}): {fix}") in printed, printed
    assert (f"[failed] webhook http://127.0.0.1:9090/webhook: Label Studio refuses "
            f"http://127.0.0.1:9090/webhook ({BLOCKED_DETAIL}): {fix}") in printed, printed
    assert "LABEL_STUDIO_API_KEY" not in printed  # the token is fine: nothing to change there
    assert "connected:" not in printed
