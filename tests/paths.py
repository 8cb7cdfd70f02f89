"""Where the tests find the shared reference material (a `shared/` folder beside the checkout)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if not SHARED.is_dir():
    raise RuntimeError(f"reference material not found at {SHARED}: expected a shared/ folder beside the repository")
