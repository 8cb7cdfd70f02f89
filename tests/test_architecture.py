"""The structure holds: the import contracts in pyproject.toml pass, and no module escapes them."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.support import REPO


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def modules(package: str) -> set[str]:
    root = REPO / package
    found = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if "checkpoint" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.add(name)
    return found


def test_the_import_contracts_are_kept():
    # What `lint-imports` runs, in this interpreter.
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_backend_module_has_a_layer():
    [layers] = [c for c in contracts() if c["type"] == "layers"]
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    assert modules("backend") - placed == {"backend"}, "place new backend modules in pyproject.toml's layers"


def test_every_model_library_module_is_kept_from_the_demo():
    [demo] = [c for c in contracts() if c.get("forbidden_modules") == ["model.demo"]]
    # Top-level modules and engine packages (a package's contract covers its submodules).
    library = {".".join(m.split(".")[:2]) for m in modules("model") if not m.startswith("model.demo")} - {"model"}
    assert library == set(demo["source_modules"]), "list new model library modules in the demo contract"
