"""The README's promises stay true: its configuration table is the settings module's, and CI runs the
test command it gives."""

from __future__ import annotations

import re

from backend.settings import settings_table_markdown
from tests.support import REPO

README = (REPO / "README.md").read_text()


def test_configuration_table_matches_the_settings():
    table = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", README, re.S)
    assert table, "the README lost its settings-table markers"
    assert table.group(1).strip() == settings_table_markdown().strip(), (
        "README configuration table is stale: regenerate it from `python -m backend settings`"
    )


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m pytest" in ci and "python -m pytest" in test_command
    assert "pip install -r requirements.txt" in test_command and "-r requirements.txt" in ci
