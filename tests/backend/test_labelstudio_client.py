"""Both kinds of Label Studio token work for every call the backend makes: legacy tokens as they are,
personal access tokens exchanged for access tokens, cached, and refreshed once on a 401."""

from __future__ import annotations

import time

import pytest

from backend.images import ImageLoader
from backend.labelstudio import (
    REFRESH_MARGIN_S,
    LabelStudioClient,
    LabelStudioCredentials,
    LabelStudioError,
    TokenKind,
    token_kind,
)
from backend.settings import Settings
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio, jwt, personal_access_token
from tests.support.requests import CAPTURED_CONFIG


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
