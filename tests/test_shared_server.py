"""One server, many users (issue 14): a long job never freezes it, hostile input never crashes it, and it reads
and writes only its own datastore. A real server on a copy of the sample data, driven over HTTP."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from helpers import read_label, start_on_sample_data

PUTAMEN_L = 73  # AAL's value (sample-data/labels/colin27_aal_names.json)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_on_sample_data(tmp_path_factory.mktemp("shared"))
    template = {"mode": "register", "label": "Putamen_L", "seglab_label": "final", "seglab_value": PUTAMEN_L,
                "slice": 80}
    r = requests.post(f"{srv.url}/infer/oneprompt", params={"image": "colin27_t1", "output": "json"},
                      data={"params": json.dumps(template)}, timeout=600)
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


def click(server, image="head_ct", point=(128, 90, 30), **extra):
    return requests.post(f"{server.url}/infer/litemedsam", params={"image": image, "output": "json"},
                         data={"params": json.dumps({"foreground": [list(point)], **extra})}, timeout=600)


def start_whole_volume_job(server) -> str:
    """A job that visits every slice of Colin27 (`volume: gate`; the default propagates over ~35 slices only)."""
    r = requests.post(f"{server.url}/jobs/infer/oneprompt", params={"image": "colin27_t1"},
                      data={"params": json.dumps({"template": "Putamen_L", "volume": "gate"})}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job(server, job_id) -> dict:
    r = requests.get(f"{server.url}/jobs/{job_id}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(predicate, timeout=300.0, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s")


def test_a_whole_volume_job_reports_progress_while_others_are_served_and_can_be_cancelled(server):
    job_id = start_whole_volume_job(server)
    wait_until(lambda: job(server, job_id)["progress"]["done"] >= 2)
    # Before: /info waited 93-149 s and a click 150 s behind such a job. The bounds are minutes below that, and
    # generous for a busy machine: what is asserted is that they are answered while the job runs.
    start = time.perf_counter()
    assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200
    assert requests.get(f"{server.url}/datastore/?output=all", timeout=60).status_code == 200
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    r = click(server)
    click_s = time.perf_counter() - start
    assert r.status_code == 200, r.text
    status = job(server, job_id)
    assert status["status"] == "running", status  # the click went in between, the job still runs
    assert status["progress"]["total"] == 181 and 0 < status["progress"]["done"] < 181
    print(f"during the job: /info + /datastore {info_s:.2f}s, a click {click_s:.2f}s; job {status['progress']}")
    assert info_s < 20 and click_s < 60

    assert requests.delete(f"{server.url}/jobs/{job_id}", timeout=60).status_code == 200
    final = wait_until(lambda: (s := job(server, job_id))["status"] != "running" and s)
    assert final["status"] == "cancelled" and final["progress"]["done"] < 181
    assert requests.get(f"{server.url}/jobs/{job_id}/result", timeout=60).status_code == 409
    assert click(server, point=(120, 100, 31)).status_code == 200  # the worker is free again


def test_a_finished_job_gives_its_label_and_is_forgotten_with_its_files(server):
    r = requests.post(f"{server.url}/jobs/infer/oneprompt", params={"image": "colin27_t1"},
                      data={"params": json.dumps({"template": "Putamen_L", "slices": [78, 83]})}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    final = wait_until(lambda: (s := job(server, job_id))["status"] not in ("queued", "running") and s)
    assert final["status"] == "done" and final["result"]["labelled_slices"] >= 3, final
    label = requests.get(f"{server.url}/jobs/{job_id}/result", params={"output": "image"}, timeout=60)
    assert label.status_code == 200
    volume = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(label.content)).dataobj)
    assert volume.shape == (181, 217, 181) and volume[:, :, 78:83].any() and not volume[:, :, :78].any()
    assert requests.delete(f"{server.url}/jobs/{job_id}", timeout=60).json()["status"] == "forgotten"
    assert requests.get(f"{server.url}/jobs/{job_id}", timeout=60).status_code == 404


def test_a_client_that_hangs_up_frees_its_worker(server):
    before = requests.get(f"{server.url}/jobs/", timeout=60).json()["total_cancelled"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server.url}/infer/oneprompt", params={"image": "colin27_t1", "output": "json"},
                      data={"params": json.dumps({"template": "Putamen_L", "volume": "gate"})}, timeout=(10, 6))
    wait_until(lambda: requests.get(f"{server.url}/jobs/", timeout=60).json()["total_cancelled"] > before, 120)
    assert click(server, point=(126, 92, 29)).status_code == 200


@pytest.mark.parametrize("query, params, status, message", [
    ({"image": "head_ct"}, "not json", 400, "must be a JSON object"),
    ({"image": "head_ct"}, "[1, 2]", 400, "must be a JSON object"),
    ({"image": "head_ct"}, {"roi": [10, float("nan"), 10, 50, 30, 30]}, 400, "roi"),
    ({"image": "head_ct"}, {"foreground": [[10, float("inf"), 30]]}, 400, "foreground"),
    ({"image": "head_ct"}, {"foreground": [[128, 90, 30]], "result_extension": "../../x.sh"}, 400, "result_extension"),
    ({"image": "head_ct"}, {"foreground": [[128, 90, 30]], "label_value": 100000}, 400, "label_value"),
    ({"image": "head_ct"}, {"foreground": [[128, 90, 30]], "label_value": 300}, 400, "uint16"),
    ({"image": "head_ct"}, {"roi": [100, 150, 60, 120, 30, 30], "slice": -5}, 400, "slice"),
    ({"image": "head_ct"}, {"roi": [100, 150, 60, 120, 30, 30], "slice": 60}, 400, "slice"),
    ({"image": "/etc/hostname"}, {"foreground": [[1, 1, 0]]}, 400, "not a path"),
    ({"image": "../head_ct"}, {"foreground": [[1, 1, 0]]}, 400, "not a path"),
    ({"image": "no_such_image"}, {"foreground": [[1, 1, 0]]}, 404, "unknown image"),
    ({"image": "head_ct"}, {"foreground": [[128, 90, 30]], "label": "/etc/passwd"}, 400, "segment's name"),
    ({"image": "head_ct", "session_id": "../../etc"}, {"foreground": [[128, 90, 30]]}, 400, "session id"),
])
def test_bad_inference_requests_get_a_4xx_with_a_reason(server, query, params, status, message):
    body = params if isinstance(params, str) else json.dumps(params)
    r = requests.post(f"{server.url}/infer/litemedsam", params={**query, "output": "json"}, data={"params": body},
                      timeout=300)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_an_unknown_model_or_strategy_is_a_404(server):
    r = requests.post(f"{server.url}/infer/no_such_model", params={"image": "head_ct"}, timeout=60)
    assert r.status_code == 404 and "no model" in r.json()["detail"]
    r = requests.post(f"{server.url}/activelearning/no_such_strategy", timeout=60)
    assert r.status_code == 404, r.text


def test_one_prompt_label_prompts_name_tags_never_server_files(server):
    for value in ("/etc/passwd", "../../../etc/passwd", "requirements.txt"):
        params = {"mode": "register", "label": "X", "seglab_label": value, "seglab_value": 1, "slice": 80}
        r = requests.post(f"{server.url}/infer/oneprompt", params={"image": "colin27_t1", "output": "json"},
                          data={"params": json.dumps(params)}, timeout=60)
        assert r.status_code == 400, r.text
        assert "exist" not in r.json()["detail"]  # the message does not tell whether such a file exists


def nifti_bytes(array: np.ndarray, affine=np.eye(4)) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def test_uploads_never_leave_the_datastore(server):
    outside = os.path.dirname(server.studies)
    data = nifti_bytes(np.zeros((8, 8, 4), np.float32))
    for query in ({"image": "../escape_probe"}, {"image": "..%2Fescape_probe"}, {"image": "/tmp/escape_probe"}):
        r = requests.put(f"{server.url}/datastore/image", params=query,
                         files={"file": ("x.nii.gz", data)}, timeout=60)
        assert r.status_code == 400, r.text
    label = nifti_bytes(np.zeros((256, 256, 60), np.uint8))
    r = requests.put(f"{server.url}/datastore/label", params={"image": "head_ct", "tag": "../../tagescape"},
                     files={"label": ("head_ct.nii.gz", label)}, timeout=60)
    assert r.status_code == 400, r.text
    assert not [f for f in os.listdir(outside) if "escape" in f]
    assert not os.path.exists(os.path.join(outside, "tagescape"))


@pytest.mark.parametrize("name, payload, status", [
    ("empty.nii.gz", b"", 422),
    ("garbage.nii.gz", b"not a nifti at all" * 20, 422),
    ("script.sh", b"#!/bin/sh\necho hi\n", 400),
])
def test_corrupt_or_wrong_image_uploads_are_refused_and_not_stored(server, name, payload, status):
    r = requests.put(f"{server.url}/datastore/image", params={"image": "upload_probe"},
                     files={"file": (name, payload)}, timeout=60)
    assert r.status_code == status, r.text
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=60).json()
    assert "upload_probe" not in json.dumps(listing)
    assert not [f for f in os.listdir(server.studies) if f.startswith(("upload_probe", ".upload_"))]


def test_an_oversized_image_is_refused_at_upload(server):
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).header
    header.set_data_shape((4096, 4096, 4096))  # 69 G voxels claimed; the data is not even there
    payload = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    r = requests.put(f"{server.url}/datastore/image", params={"image": "huge_probe"},
                     files={"file": ("huge.nii.gz", payload)}, timeout=60)
    assert r.status_code == 413 and "at most" in r.json()["detail"], r.text
    assert not [f for f in os.listdir(server.studies) if f.startswith("huge_probe")]


def test_a_truncated_image_is_refused_at_first_use(server):
    full = nifti_bytes(np.random.default_rng(0).random((64, 64, 16)).astype(np.float32))
    r = requests.put(f"{server.url}/datastore/image", params={"image": "truncated_probe"},
                     files={"file": ("t.nii.gz", full[: len(full) // 2])}, timeout=60)
    if r.status_code == 200:  # the header was whole: the image is refused when it is read
        assert click(server, image="truncated_probe", point=(10, 10, 5)).status_code == 422
    else:
        assert r.status_code == 422, r.text


@pytest.mark.parametrize("label, status, message", [
    (np.zeros((181, 217, 181), np.uint8), 400, "shape"),  # Colin27's grid, not head_ct's
    (None, 422, "readable"),  # truncated
])
def test_mismatched_or_truncated_labels_are_refused_and_the_old_label_kept(server, label, status, message):
    final = os.path.join(server.studies, "labels", "final", "head_ct.nii.gz")
    before = open(final, "rb").read()
    payload = nifti_bytes(label) if label is not None else \
        nifti_bytes(np.ones((256, 256, 60), np.uint8))[:2000]
    r = requests.put(f"{server.url}/datastore/label", params={"image": "head_ct", "tag": "final"},
                     files={"label": ("head_ct.nii.gz", payload)}, timeout=60)
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert open(final, "rb").read() == before


def test_a_session_archive_without_an_archive_name_is_a_422(server):
    """MONAI Label unpacks a session upload by its file name: a real zip named without .zip was a 500 (fuzzing)."""
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("image.nii.gz", nifti_bytes(np.zeros((4, 4, 4), np.int16)))
    response = requests.put(f"{server.url}/session/", params={"uncompress": "true"},
                            files={"files": ("files", archive.getvalue())}, timeout=60)
    assert response.status_code == 422 and ".zip" in response.text, response.text


def test_unknown_images_and_labels_are_404_in_the_datastore_endpoints(server):
    assert requests.get(f"{server.url}/datastore/image/info", params={"image": "nope"}, timeout=60).status_code == 404
    assert requests.get(f"{server.url}/datastore/label/info", params={"label": "nope", "tag": "final"},
                        timeout=60).status_code == 404
    r = requests.put(f"{server.url}/datastore/label", params={"image": "nope", "tag": "final"},
                     files={"label": ("x.nii.gz", nifti_bytes(np.zeros((4, 4, 4), np.uint8)))}, timeout=60)
    assert r.status_code == 404
    r = requests.put(f"{server.url}/datastore/image", params={"image": "params_probe"}, data={"params": "not json"},
                     files={"file": ("p.nii.gz", nifti_bytes(np.zeros((8, 8, 4), np.float32)))}, timeout=60)
    assert r.status_code == 400


def test_eight_annotators_saving_at_once_lose_nothing(server):
    images = ["head_ct", "colin27_t1", "mni152_t1"]
    shapes = {"head_ct": (256, 256, 60), "colin27_t1": (181, 217, 181), "mni152_t1": (197, 233, 189)}

    def save(n: int):
        image = images[n % len(images)]
        volume = np.zeros(shapes[image], np.uint8)
        volume[n, n, n] = n + 1  # who saved it
        tag = f"user{n}"
        r = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": tag},
                         data={"params": json.dumps({"user": tag})},
                         files={"label": (f"{image}.nii.gz", nifti_bytes(volume))}, timeout=300)
        return image, tag, n, r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(save, range(8)))
    assert all(status == 200 for *_, status in results), results
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=60).json()
    for image, tag, n, _ in results:
        saved = read_label(os.path.join(server.studies, "labels", tag, f"{image}.nii.gz"))
        assert saved[n, n, n] == n + 1 and int((saved > 0).sum()) == 1
        assert tag in listing["objects"][image]["labels"]
        info = requests.get(f"{server.url}/datastore/label/info", params={"label": image, "tag": tag},
                            timeout=60).json()
        assert info["user"] == tag


def test_the_server_survives_and_keeps_serving(server):
    assert server.alive()
    assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200
