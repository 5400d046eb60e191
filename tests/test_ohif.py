"""OHIF v3 (as the monailabel wheel ships it, with our panel changes: lib/server/ohif.py) in a real browser on the
PACS set-up: open the sample CT from Orthanc, connect the MONAI Label panel, click in the image with litemedsam, see
the mask, submit it, and find it in Orthanc as a DICOM SEG with the same voxels.

Playwright (pinned, from PyPI) drives Debian's chromium (never a downloaded browser), headless, WebGL by SwiftShader.
scripts/test.sh installs chromium, orthanc and orthanc-dicomweb; without them this test fails and says so.

Set OHIF_SCREENSHOT=path.png to keep the screenshot of the viewer with the mask (the README's is made so).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time

import nrrd
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from PIL import Image

from helpers import SAMPLE_DATA, dice
from pacs_helpers import start_app, start_orthanc

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
PANEL_WAIT_MS = 300_000  # generous: the whole path runs on a 2-core CPU that may be busy


@pytest.fixture(scope="module")
def pacs_app(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run the README's test command (bash scripts/test.sh installs the "
                    "Debian package chromium)")
    root = str(tmp_path_factory.mktemp("ohif"))
    orthanc, series = start_orthanc(root)
    server = None
    try:
        server = start_app(orthanc, root)
        yield orthanc, series["head_ct"], server
    finally:
        if server:
            server.stop()
        orthanc.stop()


def truth_on_grid(server, uid: str, tmp_path) -> np.ndarray:
    """The sample label on the series' grid as the server converted it, indexed (i, j, k) like the viewer's volume."""
    response = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
    assert response.status_code == 200, response.text
    (tmp_path / "image.nii.gz").write_bytes(response.content)
    image = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    label = sitk.ReadImage(os.path.join(SAMPLE_DATA, "labels", "final", "head_ct.nii.gz"))
    on_grid = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return image, sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0)


def newest_seg_of(orthanc, series_uid: str, tmp_path) -> pydicom.Dataset:
    segs = [s for s in requests.get(f"{orthanc.url}/series", params={"expand": 1}, timeout=30).json()
            if s["MainDicomTags"].get("Modality") == "SEG"]
    datasets = []
    for seg in segs:
        path = tmp_path / f"{seg['ID']}.dcm"
        path.write_bytes(requests.get(f"{orthanc.url}/instances/{seg['Instances'][0]}/file", timeout=60).content)
        ds = pydicom.dcmread(str(path))
        if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            datasets.append(ds)
    assert datasets, "no SEG in Orthanc references the series"
    return max(datasets, key=lambda d: (d.SeriesDate, d.SeriesTime))


def viewport_pixels(page, viewport: str) -> np.ndarray:
    box = page.locator(f"[data-viewport-uid={viewport}]").bounding_box()
    shot = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)


def test_click_mask_submit_seg_in_orthanc(pacs_app, tmp_path):
    from playwright.sync_api import sync_playwright

    orthanc, series, server = pacs_app
    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(PANEL_WAIT_MS)
            page.on("dialog", lambda dialog: dialog.accept())
            start = time.perf_counter()
            # 1. the viewer on the sample study, in MONAI Label's mode
            page.goto(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={series['study']}")
            page.wait_for_selector("[data-viewport-uid=mpr-axial] canvas")
            page.wait_for_function("() => document.body.innerText.includes('head_ct axial')")
            timings["viewer open"] = time.perf_counter() - start
            if page.locator("text=Confirm and Hide").count():
                page.click("text=Confirm and Hide")
            # 2. the panel, on our server (its default is now the page's own origin)
            assert page.input_value("#monailabelServerURL").rstrip("/") == server.url
            page.click("table.settingsTable button.actionButton")
            point_prompts = page.locator("div.tab:has(label.tab-label:has-text('Point Prompts'))")
            page.click("label.tab-label:has-text('Point Prompts')")
            # 3. litemedsam
            point_prompts.locator("select.selectBox").select_option("litemedsam")
            point_prompts.locator("tr.clickable-row:has-text('object')").click()
            # 4. a foreground click in the middle of the brain on the axial view, then Run
            box = page.locator("[data-viewport-uid=mpr-axial]").bounding_box()
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 - 20)
            page.wait_for_timeout(500)
            before = viewport_pixels(page, "mpr-axial")
            start = time.perf_counter()
            with page.expect_response(lambda r: "/infer/litemedsam" in r.url) as answer:
                point_prompts.locator("button[title='Run PointPrompts']").click()
            response = answer.value
            timings["click to mask, series fetched from the PACS and converted"] = time.perf_counter() - start
            assert response.status == 200, response.text()
            page.wait_for_selector("text=Running Inference for Point Prompts - Successful")
            page.wait_for_timeout(1500)
            after = viewport_pixels(page, "mpr-axial")
            mask_file = tmp_path / "mask.nrrd"
            mask_file.write_bytes(response.body())
            screenshot = tmp_path / "ohif.png"
            page.screenshot(path=str(screenshot))
            if os.environ.get("OHIF_SCREENSHOT"):
                shutil.copy(screenshot, os.environ["OHIF_SCREENSHOT"])
            # 6. Submit Label (Active Learning tab)
            page.click("label.tab-label:has-text('Active Learning')")
            start = time.perf_counter()
            with page.expect_response(lambda r: "/datastore/label" in r.url and r.request.method == "PUT") as saved:
                page.click("button:has-text('Submit Label')")
            timings["submit to SEG stored"] = time.perf_counter() - start
            assert saved.value.status == 200, saved.value.text()
            page.wait_for_selector("text=Label submitted: saved on the PACS")
        finally:
            browser.close()
    print("OHIF timings (s):", {k: round(v, 2) for k, v in timings.items()})

    # 5. the click reached the server in the right voxel, and the viewer shows the mask
    image, truth = truth_on_grid(server, series["series"], tmp_path)
    with open(server.log_path) as f:
        logged = [line for line in f if "infer litemedsam on " + series["series"] in line]
    assert logged, "the server's log has no line for the click"
    prompts = json.loads(re.search(r": (\{.*\})\s*$", logged[-1]).group(1))
    (i, j, k), = prompts["foreground"]
    assert truth[i, j, k] == 2, "the click is in the middle of the brain: the intracranial region"
    mask, _ = nrrd.read(str(mask_file))  # (i, j, k): the viewer's own voxel order
    assert mask.shape == truth.shape
    assert mask[i, j, k] > 0 and dice(mask[:, :, k] > 0, truth[:, :, k] == 2) > 0.5
    changed = np.abs(after - before).sum(axis=2) > 30
    assert changed.mean() > 0.01, f"the viewer's pixels did not change: {changed.mean():.4f} changed"

    # 7. the SEG in Orthanc: it references the series, and its mask is the one the server returned
    import pydicom_seg

    seg = newest_seg_of(orthanc, series["series"], tmp_path)
    assert seg.StudyInstanceUID == series["study"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["object"]
    decoded = sitk.Resample(pydicom_seg.MultiClassReader().read(seg).image, image, sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0)
    stored = sitk.GetArrayFromImage(decoded).transpose(2, 1, 0)
    score = dice(stored > 0, mask > 0)
    print("SEG in Orthanc against the mask the server returned: Dice", round(score, 4))
    assert score >= 0.9
