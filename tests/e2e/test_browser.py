"""Our predictions render in Label Studio's labeling UI, as an annotator sees them, and they are right.

A headless Chromium logs in to the test Label Studio with the user the harness created, opens a task whose
only prediction was made by our backend (the shipped demo model) through "Retrieve Predictions", and
selects the region in the regions panel. The editor must show the image, the predicted label, the caption
in the region's TextArea and the predicted value checked in every per-region Choices; and the object's true
colour must be the one ticked and named in the caption. A screenshot of that view is kept either way; the
run's summary names it (``e2e artifact: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import test_backend_with_labelstudio as protocol
from .labelstudio import LabelStudioClient, LabelStudioServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from .conftest import Artifacts

# The protocol tests' backend and project, set up again for this module (they are module-scoped).
demo_models = protocol.demo_models
our_backend = protocol.our_backend
connected = protocol.connected

# Tall enough that the last per-region Choices is in the screenshot.
VIEWPORT = {"width": 1400, "height": 1050}
# Label Studio's bundle is large and the machine may be busy.
UI_TIMEOUT_MS = 60_000
CHOICES = [name for name, kind in protocol.PER_REGION.items() if kind == "choices"]


def only_our_prediction(project: protocol.ConnectedProject, ls_client: LabelStudioClient,
                        task_id: int) -> dict[str, Any]:
    """Retrieve our prediction for a task and delete the others, so that the editor pre-fills from ours."""
    ls_client.retrieve_predictions(project.project["id"], [task_id])
    # The task's detector prediction plus ours.
    predictions = ls_client.wait_for_predictions(task_id, count=2, timeout_s=protocol.PREDICTION_TIMEOUT_S)
    ours = [p for p in predictions if p["model_version"] == project.model_version]
    assert len(ours) == 1, predictions
    for prediction in predictions:
        if prediction is not ours[0]:
            ls_client.delete_prediction(prediction["id"])
    return ours[0]


def log_in(page: Page, server: LabelStudioServer) -> None:
    """Log in through Label Studio's login form."""
    page.goto(f"{server.url}/user/login/")
    page.fill("input[name=email]", server.credentials.username)
    page.fill("input[name=password]", server.credentials.password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "/user/login" not in page.url, f"login refused: {page.inner_text('body')[:500]}"


def open_and_select_region(page: Page, server: LabelStudioServer, project_id: int, task_id: int) -> None:
    """Open the task in the data manager's labeling view and select its one region."""
    page.goto(f"{server.url}/projects/{project_id}/data?task={task_id}")
    page.wait_for_function(
        "() => { const img = document.querySelector('img[alt=image]');"
        " return img !== null && img.complete && img.naturalWidth > 0; }")
    page.click(".lsf-outliner-item__title")
    # Per-region Choices are rendered only while their region is selected.
    page.wait_for_selector(".lsf-choices input:checked")


def test_browser_shows_our_caption_and_choices_for_the_selected_region(
        browser: Browser, connected: protocol.ConnectedProject, ls_client: LabelStudioClient,
        labelstudio: LabelStudioServer, artifacts: Artifacts, tmp_path: Path):
    scene = connected.scenes[1]
    task_id = scene.task_id
    prediction = only_our_prediction(connected, ls_client, task_id)
    values = {item["from_name"]: item["value"] for item in prediction["result"]}
    (label,) = values["bbox"]["rectanglelabels"]
    (caption,) = values["caption"]["text"]

    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        log_in(page, labelstudio)
        try:
            open_and_select_region(page, labelstudio, connected.project["id"], task_id)
        finally:
            screenshot = tmp_path / "labeling-ui.png"
            page.screenshot(path=str(screenshot))
            artifacts.keep(screenshot)
        region_title = page.inner_text(".lsf-outliner-item__title")
        # A submitted text shows as its own textarea per item; the "add text" input is gone at maxSubmissions.
        shown_captions = page.get_by_test_id("textarea-region-textarea").evaluate_all("els => els.map(e => e.value)")
        checked = page.locator(".lsf-choices").evaluate_all(
            "groups => groups.map(g => Array.from(g.querySelectorAll('input:checked'), i => i.name))")
    finally:
        context.close()

    assert region_title.strip() == label
    assert shown_captions == [caption]
    assert checked == [values[name]["choices"] for name in CHOICES]
    # What the annotator sees is right: the object's colour ticked, and named in the caption.
    assert checked[CHOICES.index("color")] == [scene.obj.color], (scene.obj, checked)
    assert scene.obj.color in caption.split(), (scene.obj, caption)
