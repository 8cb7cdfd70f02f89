"""Every setting comes from one documented place, with checked values."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError, describe_settings, settings_table_markdown
from tests.support import REPO


def test_every_field_has_a_unique_environment_variable_and_a_description():
    rows = describe_settings()
    assert [r.name for r in rows] == [f.name for f in dataclasses.fields(Settings)]
    assert len({r.env for r in rows}) == len(rows)
    assert all(r.env.isupper() and len(r.description) > 15 for r in rows)


def test_the_official_backend_variable_names_are_kept():
    envs = {r.env for r in describe_settings()}
    assert {"BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR",
            "LOG_LEVEL", "THREADS", "PORT"} <= envs


def test_defaults_keep_label_studio_within_its_timeouts():
    settings = Settings()
    assert settings.port == 9090
    # Label Studio gives /predict ML_TIMEOUT_PREDICT = 100 s.
    assert settings.interactive_timeout < 100 and settings.batch_deadline < 100
    assert settings.redis_url == "" and settings.effective_redis_url == "redis://127.0.0.1:6379/0"


def test_values_are_parsed_by_type():
    settings = Settings.from_env({
        "PORT": "9191", "INTERACTIVE_TIMEOUT": "12.5", "INTERACTIVE_KEEP_DRAWN_LABEL": "no",
        "ALLOWED_IMAGE_HOSTS": "Images.Example.com, cdn.example.com:8443,", "MODEL_DIR": "/srv/models",
        "MAX_IMAGE_BYTES": "1_000_000",
    })
    assert settings.port == 9191 and settings.interactive_timeout == 12.5
    assert settings.keep_drawn_label is False
    assert settings.allowed_image_hosts == ("images.example.com", "cdn.example.com:8443")
    assert settings.model_dir == Path("/srv/models") and settings.max_image_bytes == 1_000_000


@pytest.mark.parametrize("env, message", [
    ({"PORT": "ninety"}, "PORT='ninety' is not valid"),
    ({"INTERACTIVE_KEEP_DRAWN_LABEL": "maybe"}, "INTERACTIVE_KEEP_DRAWN_LABEL='maybe'"),
    ({"INTERACTIVE_TIMEOUT": "0"}, "INTERACTIVE_TIMEOUT must be positive"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "must start with http"),
    ({"BASIC_AUTH_USER": "only-user"}, "both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
    ({"DTYPE": "int8"}, "DTYPE must be"),
    ({"JOB_RETRIES": "-1"}, "must not be negative"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_secrets_are_hidden_in_repr():
    settings = Settings.from_env({"LABEL_STUDIO_API_KEY": "Zq1-key", "BASIC_AUTH_USER": "u",
                                  "BASIC_AUTH_PASS": "Zq2-pass", "WEBHOOK_SECRET": "Zq3-secret"})
    text = repr(settings)
    assert "Zq" not in text
    assert "basic_auth_user='u'" in text and "webhook_secret='***'" in text


def test_image_hosts_default_to_the_label_studio_host():
    assert Settings(label_studio_url="https://user@ls.example.com:8443/").image_hosts == ("ls.example.com:8443",)
    assert Settings().image_hosts == ()
    assert Settings(allowed_image_hosts=("*",), label_studio_url="http://ls").image_hosts == ("*",)


def test_the_configuration_table_lists_every_variable():
    table = settings_table_markdown()
    for row in describe_settings():
        assert f"| `{row.env}` |" in table
    done = subprocess.run([sys.executable, "-m", "backend", "settings"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == table


def test_the_replaced_annotator_class_setting_is_refused_with_its_successor():
    with pytest.raises(SettingsError, match="ANNOTATOR_CLASS was replaced by ENGINE"):
        Settings.from_env({"ANNOTATOR_CLASS": "model.inference.RegionAnnotator"})
