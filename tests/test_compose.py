"""The deployment files (docker-compose.yml, Dockerfile, .env.example) agree with the code they deploy.

Docker is not needed: the files are parsed and checked against `backend.settings` and the command line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
BACKEND_SERVICES = ("backend", "worker", "finetune")
LONG_RUNNING = ("label-studio", "redis", "postgres", "backend", "worker")
GPU_RESERVATION = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    """NAME=value lines of .env.example."""
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, flags=re.M))


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute ${...} the way docker compose does with `env` as its .env file."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        present = name in env and (env[name] != "" or not operator.startswith(":"))
        if present:
            return env[name]
        if operator.endswith("?"):
            raise AssertionError(f"docker-compose.yml requires {name}: {argument}")
        return argument if operator.endswith("-") else ""

    return VARIABLE.sub(value, text)


# What an operator fills in after copying .env.example (which pre-fills no secret).
OPERATOR_SECRETS = {"LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": "ls-password",
                    "POSTGRES_PASSWORD": "pg-password", "REDIS_PASSWORD": "redis-password",
                    "BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": "api-password"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as compose resolves it with .env.example copied to .env and the secrets set."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(encoding="utf-8"), {**env_example(), **OPERATOR_SECRETS}))


def test_no_password_is_pre_filled_and_compose_refuses_to_start_without_them():
    example = env_example()
    secrets = [name for name in example if name.endswith(("PASSWORD", "_PASS", "SECRET", "API_KEY"))]
    assert {"LABEL_STUDIO_PASSWORD", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "BASIC_AUTH_PASS"} <= set(secrets)
    assert {name: example[name] for name in secrets if example[name]} == {}
    with pytest.raises(AssertionError, match="requires"):
        interpolate(COMPOSE.read_text(encoding="utf-8"), example)
    for name in ("REDIS_PASSWORD", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "POSTGRES_PASSWORD"):
        with pytest.raises(AssertionError, match=f"requires {name}"):
            interpolate(COMPOSE.read_text(encoding="utf-8"), {**example, **OPERATOR_SECRETS, name: ""})


def published(service: dict[str, Any]) -> list[str]:
    """The host address of every published port ("0.0.0.0" when a mapping names none)."""
    addresses = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            addresses.append(str(port.get("host_ip") or "0.0.0.0"))
        else:
            parts = str(port).split(":")
            addresses.append(":".join(parts[:-2]) if len(parts) > 2 else "0.0.0.0")
    return addresses


def test_no_service_is_published_beyond_this_machine_by_default(services: dict[str, Any]):
    everywhere = {name: published(s) for name, s in services.items() if set(published(s)) - {"127.0.0.1"}}
    assert everywhere == {}
    assert published(services["backend"]) == ["127.0.0.1"] and published(services["label-studio"]) == ["127.0.0.1"]


def test_the_api_binding_every_address_requires_basic_auth(services: dict[str, Any]):
    env = environment(services["backend"])
    assert env["HOST"] == "0.0.0.0"
    settings = Settings.from_env({k: v for k, v in env.items() if k != "DATABASE_URL"})
    assert not settings.answers_this_machine_only and settings.basic_auth_enabled


def test_redis_requires_a_password_that_every_backend_process_sends(services: dict[str, Any]):
    command = services["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert password == OPERATOR_SECRETS["REDIS_PASSWORD"]
    assert environment(services["redis"])["REDISCLI_AUTH"] == password  # the health check's redis-cli
    for name in BACKEND_SERVICES:
        assert urlsplit(environment(services[name])["REDIS_URL"]).password == password


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a list of NAME=value too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath]]:
    """(source, container path) of every volume of a service, short or long syntax."""
    result = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result.append((str(volume["source"]), PurePosixPath(volume["target"])))
        else:
            source, target = volume.split(":")[:2]
            result.append((source, PurePosixPath(target)))
    return result


def settings_env_names() -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(Settings)}


def test_compose_has_every_service(services: dict[str, Any]):
    assert set(services) == {"label-studio", "redis", "postgres", "backend", "worker", "finetune-worker", "finetune"}


def test_the_finetune_queue_has_a_consumer_with_its_own_gpu(services: dict[str, Any]):
    consumer = services["finetune-worker"]
    assert consumer["command"] == ["python", "-m", "backend", "finetune-worker"]
    devices = consumer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_label_studio_is_the_stock_official_image_allowed_to_reach_the_backend(services: dict[str, Any]):
    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = environment(ls)
    # Both switches are needed: with only the first, connecting works but no webhook is created.
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    # Legacy tokens stay as a stock organization has them: off; the backend holds a personal access token.
    assert not any("LEGACY" in name for name in env)
    assert PurePosixPath("/label-studio/data") in [target for _, target in mounts(ls)]


def test_the_backend_is_reached_over_the_compose_network(services: dict[str, Any]):
    env = environment(services["backend"])
    assert env["BACKEND_URL"] == "http://backend:9090" and env["HOST"] == "0.0.0.0"


def test_redis_persists_with_an_append_only_file(services: dict[str, Any]):
    redis = services["redis"]
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert command[command.index("--appendonly") + 1] == "yes"
    assert PurePosixPath("/data") in [target for _, target in mounts(redis)]


def test_backend_services_run_the_backend_commands(services: dict[str, Any]):
    assert services["backend"]["command"] == ["python", "-m", "backend", "serve-api"]
    assert services["worker"]["command"] == ["python", "-m", "backend", "worker"]
    assert services["finetune"]["command"][:2] == ["python", "backend/finetune.py"]
    # The container side of the port mapping is the port the API listens on.
    container_ports = [str(p).rsplit(":", 1)[-1] for p in services["backend"]["ports"]]
    assert container_ports == [environment(services["backend"])["PORT"]] == ["9090"]
    for name in BACKEND_SERVICES:
        assert services[name]["image"] == services["backend"]["image"], f"{name} must share the one image"


@pytest.mark.parametrize("subcommand", ["serve-api", "worker"])
def test_backend_command_line_has_the_subcommands_compose_uses(subcommand: str):
    answer = subprocess.run([sys.executable, "-m", "backend", subcommand, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert answer.returncode == 0, answer.stderr


def test_finetune_script_runs_where_compose_runs_it(services: dict[str, Any]):
    script = ROOT / services["finetune"]["command"][1]
    assert script.is_file(), f"docker-compose.yml runs {script.relative_to(ROOT)}, which does not exist"
    # As in the image: project root as working directory and on PYTHONPATH.
    answer = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert answer.returncode == 0, answer.stderr


def test_finetune_is_an_on_demand_job(services: dict[str, Any]):
    finetune = services["finetune"]
    assert finetune["profiles"] == ["finetune"]
    assert finetune["restart"] == "no"


@pytest.mark.parametrize("name", BACKEND_SERVICES)
def test_backend_env_names_are_backend_settings(services: dict[str, Any], name: str):
    unknown = set(environment(services[name])) - settings_env_names()
    assert not unknown, f"{name} sets variables backend/settings.py does not read: {sorted(unknown)}"


@pytest.mark.parametrize("name", BACKEND_SERVICES)
def test_backend_reaches_label_studio_and_redis_by_service_name(services: dict[str, Any], name: str):
    env = environment(services[name])
    ls_url = urlsplit(env["LABEL_STUDIO_URL"])
    assert ls_url.scheme == "http"
    assert ls_url.hostname == "label-studio", "inside Docker Label Studio is not on localhost"
    assert ls_url.port == 8080
    redis_url = urlsplit(env["REDIS_URL"])
    assert (redis_url.scheme, redis_url.hostname) == ("redis", "redis")
    # The values must also be valid settings.
    Settings.from_env(env)


@pytest.mark.parametrize("name", BACKEND_SERVICES)
def test_model_and_data_dirs_are_on_mounted_volumes(services: dict[str, Any], name: str):
    env = environment(services[name])
    targets = [target for _, target in mounts(services[name])]
    for variable in ("MODEL_DIR", "DATA_DIR"):
        path = PurePosixPath(env[variable])
        assert path.is_absolute(), f"{name}: {variable}={path} must be absolute"
        assert any(path == t or t in path.parents for t in targets), (
            f"{name}: {variable}={path} is not below any mounted volume {targets}")


def test_backend_processes_share_one_registry_and_data_folder(services: dict[str, Any]):
    # The API records corrections and reads the current version; the worker loads it; finetune adds one.
    seen = {(environment(services[n])["MODEL_DIR"], environment(services[n])["DATA_DIR"],
             tuple(mounts(services[n]))) for n in BACKEND_SERVICES}
    assert len(seen) == 1, seen


@pytest.mark.parametrize("name", ["worker", "finetune"])
def test_gpu_is_reserved(services: dict[str, Any], name: str):
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [GPU_RESERVATION]


def test_worker_scales_with_replicas(services: dict[str, Any]):
    assert "replicas" in services["worker"]["deploy"]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks_and_restart(services: dict[str, Any], name: str):
    service = services[name]
    check = service["healthcheck"]
    assert not check.get("disable", False)
    assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}


def test_backend_healthcheck_probes_its_own_health_route(services: dict[str, Any]):
    probe = " ".join(services["backend"]["healthcheck"]["test"])
    assert f"127.0.0.1:{environment(services['backend'])['PORT']}/health" in probe


def test_services_wait_for_a_healthy_redis(services: dict[str, Any]):
    for name in BACKEND_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]):
    named = {source for service in services.values() for source, _ in mounts(service)
             if not source.startswith((".", "/", "$", "~"))}
    assert named <= set(compose.get("volumes") or {})


def test_every_required_variable_is_in_env_example():
    text = COMPOSE.read_text(encoding="utf-8")
    documented = set(env_example())
    required = {name for name, operator, _ in VARIABLE.findall(text) if operator in {"", ":?", "?"}}
    assert required, "docker-compose.yml no longer reads its secrets from .env"
    assert required <= documented, f"missing from .env.example: {sorted(required - documented)}"
    every = {name for name, _, _ in VARIABLE.findall(text)}
    assert documented <= every, f".env.example lists variables compose ignores: {sorted(documented - every)}"


def test_dockerfile_builds_one_python_311_image_with_the_project_installed():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    # The declared dependencies are installed before the code is copied, so code edits keep the torch layer.
    assert lines.index("COPY pyproject.toml ./") < lines.index("COPY . .")
    dependencies = next(i for i, line in enumerate(lines) if "['project']['dependencies']" in line)
    assert dependencies < lines.index("COPY . .")
    # Then the project itself: `python backend/finetune.py` (compose's fine-tune job) imports the package.
    assert lines.index("RUN pip install --no-deps .") > lines.index("COPY . .")
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    env_lines = " ".join(line for line in lines if line.startswith(("ENV", "MODEL_DIR", "DATA_DIR")))
    assert "MODEL_DIR=/data/models" in env_lines and "DATA_DIR=/data" in env_lines
    assert "WORKDIR /app" in lines


def test_dockerignore_keeps_data_and_git_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "data", ".env", "__pycache__"} <= ignored
    assert not ignored & {"backend", "model", "pyproject.toml", "README.md"}, "the image needs these"


def test_every_backend_process_shares_one_postgres_database(services: dict[str, Any]):
    urls = {environment(services[name])["DATABASE_URL"] for name in (*BACKEND_SERVICES, "finetune-worker")}
    assert len(urls) == 1
    url = urlsplit(urls.pop())
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    postgres = services["postgres"]
    assert environment(postgres)["POSTGRES_PASSWORD"] == url.password
    assert environment(postgres)["POSTGRES_USER"] == url.username and url.path == "/" + environment(postgres)[
        "POSTGRES_DB"]
    assert ("postgres-data", PurePosixPath("/var/lib/postgresql/data")) in mounts(postgres)
    assert "pg_isready" in postgres["healthcheck"]["test"]
    for name in BACKEND_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_api_scales_with_replicas(services: dict[str, Any]):
    assert "replicas" in services["backend"]["deploy"]
