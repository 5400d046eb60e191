"""Request parsing: the shapes Slicer and OHIF send, and clear 400s for what cannot be served."""

import numpy as np
import pytest

from lib.core.errors import RequestError
from lib.core.prompts import parse_prompt

SHAPE = (181, 217, 181)


def test_slicer_click_on_axial_slice():
    p = parse_prompt({"foreground": [[90, 100, 80]], "background": [[10, 10, 80], [5, 5, 12]]}, SHAPE)
    assert (p.axis, p.index) == (2, 80)
    np.testing.assert_allclose(p.foreground, [[100, 90]])  # (row=j, col=i)
    np.testing.assert_allclose(p.background, [[10, 10]])  # the point on slice 12 belongs elsewhere


def test_slicer_roi_is_interleaved_min_max_and_may_be_flipped():
    p = parse_prompt({"roi": [120, 60, 70, 110, 80, 80], "foreground": [], "background": []}, SHAPE)
    assert p.index == 80 and p.box == (70.0, 60.0, 110.0, 120.0)


def test_explicit_slice_and_axis():
    p = parse_prompt({"foreground": [[40, 100, 90]], "axis": 0, "slice": 40}, SHAPE)
    assert (p.axis, p.index) == (0, 40)
    np.testing.assert_allclose(p.foreground, [[90, 100]])  # cols = j, rows = k


def test_2d_points_take_x_y():
    p = parse_prompt({"foreground": [[30, 12, 0]], "roi": [10, 50, 5, 20]}, (64, 32))
    assert p.axis is None and p.index is None
    np.testing.assert_allclose(p.foreground, [[12, 30]])
    assert p.box == (5.0, 10.0, 20.0, 50.0)


@pytest.mark.parametrize("request_, message", [
    ({"foreground": [], "background": []}, "no prompt"),
    ({"background": [[1, 1, 1]]}, "no prompt"),
    ({"foreground": [[500, 1, 1]]}, "outside the image"),
    ({"foreground": [[1, 1, -3]]}, "outside the image"),
    ({"foreground": [["a", 1, 1]]}, "voxel coordinates"),
    ({"roi": [1, 2, 3]}, "'roi' must be"),
    ({"roi": [1, 5, 1, 5, 300, 310]}, "outside the image"),
    ({"foreground": [[1, 1, 1]], "axis": 5}, "'axis' must be"),
    ({"foreground": [[1, 1, 1]], "slice": 999}, "outside 0..180"),
    ({"foreground": "[[1, 1", "background": []}, "not valid JSON"),
    ({"roi": [1, float("nan"), 1, 5, 3, 4]}, "'roi' must be"),
    ({"roi": "[1, NaN, 1, 5, 3, 4]"}, "'roi' must be"),
    ({"foreground": [[1, float("inf"), 1]]}, "voxel coordinates"),
])
def test_bad_prompts_are_400_with_a_reason(request_, message):
    with pytest.raises(RequestError) as e:
        parse_prompt(request_, SHAPE)
    assert e.value.status_code == 400 and message in e.value.detail


@pytest.mark.parametrize("extension", ["../../x.sh", ".sh", "nii.gz/.."])
def test_a_result_extension_outside_the_allow_list_is_400_and_writes_nothing(extension, tmp_path, monkeypatch):
    import tempfile

    from lib.core.images import LoadedImage, write_label

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = LoadedImage(path="x", fingerprint=("x",), array=__import__("torch").zeros((1, 4, 4)), affine=np.eye(4), meta={})
    with pytest.raises(RequestError) as e:
        write_label(np.zeros((4, 4), np.uint8), image, extension)
    assert e.value.status_code == 400 and "result_extension" in e.value.detail
    assert not list(tmp_path.iterdir())
