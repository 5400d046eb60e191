"""One prompted slice -> a whole volume (lib/oneprompt/volume.py), on synthetic slices whose truth is known: the
propagation follows the structure and stops where it ends, whichever of the three rules sees the end first; the
locator picks the candidate most like the template; the seed's 3D component is kept; the body extent ignores
dark background. The served path on real scans is in tests/test_oneprompt_serving.py."""

from __future__ import annotations

import numpy as np
import torch

from lib.oneprompt.volume import (Geometry, VolumeSettings, body_extent, kept_steps, largest_run, locate, mask_box,
                                  trace)

SIZE = 256
FIRST, LAST = 10, 30  # the structure's slices
GEOMETRY = Geometry(pixel_mm=(1.0, 1.0), spacing_mm=1.0)


def disk(centre, radius) -> np.ndarray:
    y, x = np.ogrid[:SIZE, :SIZE]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2


class Phantom:
    """A disk (radius 20 px in the middle, shrinking towards both ends) on slices FIRST..LAST. SAM answers the
    part of the slice's content inside the box; past the structure's ends the box holds other tissue: a
    neighbour blob of the box's size (`beyond`: "tissue", unlike the template; "leak", a growing blob like it)."""

    def __init__(self, beyond: str = "tissue", tip_radius: float = 6.0):
        self.beyond, self.tip_radius = beyond, tip_radius

    def truth(self, k: int) -> np.ndarray:
        if not FIRST <= k <= LAST:
            return np.zeros((SIZE, SIZE), bool)
        middle = (FIRST + LAST) / 2
        radius = self.tip_radius + (20 - self.tip_radius) * (1 - abs(k - middle) / (middle - FIRST))
        return disk((128, 128), radius)

    def oneprompt(self, index: int) -> np.ndarray:
        return self.truth(index).astype(np.float32)

    def sam(self, index: int, box_rc: tuple) -> tuple[np.ndarray, float]:
        r0, c0, r1, c1 = (int(v) for v in box_rc)
        inside = np.zeros((SIZE, SIZE), bool)
        inside[r0:r1 + 1, c0:c1 + 1] = True
        if self.truth(index).any():
            return self.truth(index) & inside, 0.9
        if self.beyond == "leak":  # larger than the box: the mask runs into a neighbour
            return disk((128, 128), 1.5 * (c1 - c0) / 2), 0.8
        return inside, 0.5

    def intensity(self, index: int) -> np.ndarray:
        ripple = 0.01 * (np.arange(SIZE) % 3)[None, :]
        if self.beyond == "leak":  # the neighbour it leaks into has the structure's intensity
            return np.full((SIZE, SIZE), 0.5) + ripple
        return np.where(self.truth(index), 0.5, 0.2) + ripple

    def similarity(self, index: int, mask: np.ndarray) -> float:
        truth = self.truth(index)
        if self.beyond in ("leak", "look-alike"):
            return 0.9  # looks like the template to the prototype
        return 0.9 if truth.any() and (mask & truth).sum() >= 0.5 * mask.sum() else 0.2


def test_propagation_follows_the_structure_and_stops_where_it_ends():
    phantom = Phantom()
    seed = phantom.truth(20)
    up = trace(phantom, 20, seed, 1, 60, GEOMETRY, VolumeSettings())
    down = trace(phantom, 20, seed, -1, 60, GEOMETRY, VolumeSettings())
    assert [s.index for s in up if not s.stop] == list(range(21, LAST + 1))
    assert [s.index for s in down if not s.stop] == list(range(FIRST, 20))[::-1]
    assert up[-1].index == LAST + 1 and up[-1].stop == "ended (not the template's structure)"
    for step in up[:-1]:  # each kept slice is the structure, whole
        assert (step.mask == phantom.truth(step.index)).all()


def test_a_structure_that_fades_out_stops_on_the_area_rule():
    phantom = Phantom(tip_radius=0.8)  # the tips are under a pixel: nothing left to segment
    steps = trace(phantom, 20, phantom.truth(20), 1, 60, GEOMETRY, VolumeSettings(min_area_mm2=4.0))
    assert steps[-1].stop == "ended (area)" and steps[-1].index <= LAST
    assert all(s.area_mm2 >= 4.0 for s in steps[:-1])


def test_tissue_of_another_intensity_stops_on_the_intensity_rule():
    phantom = Phantom(beyond="look-alike")  # the prototype cannot tell, the intensity can
    steps = trace(phantom, 20, phantom.truth(20), 1, 60, GEOMETRY, VolumeSettings())
    assert steps[-1].stop == "ended (other tissue)" and steps[-1].index == LAST + 1


def test_a_leak_into_a_similar_neighbour_stops_on_the_growth_rule():
    phantom = Phantom(beyond="leak")
    steps = trace(phantom, 20, phantom.truth(20), 1, 60, GEOMETRY, VolumeSettings(max_growth=1.0))
    assert steps[-1].stop == "leaked (grew too fast)" and steps[-1].index == LAST + 1
    # the same run with the rule off runs on to the end of the volume; replaying the rule keeps what it kept
    never = trace(phantom, 20, phantom.truth(20), 1, 60, GEOMETRY, VolumeSettings(max_growth=float("inf")))
    assert never[-1].index == 59 or never[-1].stop == "ended (area)"
    replayed = kept_steps(never, lambda s: "leaked" if s.growth > 1.0 else None)
    assert [s.index for s in replayed] == [s.index for s in steps[:-1]]


def test_the_physical_spacing_scales_the_growth_rule():
    """The same change of area between two slices counts five times less on 5 mm slices than on 1 mm ones."""
    phantom = Phantom(beyond="leak")
    never = VolumeSettings(max_growth=float("inf"), max_similarity_drop=float("inf"),
                           max_intensity_shift=float("inf"))
    thin = trace(phantom, 20, phantom.truth(20), 1, 40, GEOMETRY, never)
    thick = trace(phantom, 20, phantom.truth(20), 1, 40, Geometry(pixel_mm=(1.0, 1.0), spacing_mm=5.0), never)
    leak = LAST + 1 - 21  # the step onto the first slice past the structure
    assert thin[leak].growth > 1.0 and np.isclose(thick[leak].growth, thin[leak].growth / 5)


def test_the_locator_picks_the_slice_most_like_the_template():
    phantom = Phantom()
    found = locate(phantom, [40, 35, 25, 5], (100, 100, 160, 160), centre=30, reach=15, settings=VolumeSettings())
    assert found["index"] == 25 and found["similarity"] == 0.9
    # the same look of the structure, nearer to where the template slice lies, wins
    nearer = locate(phantom, [12, 25], (100, 100, 160, 160), centre=12, reach=15, settings=VolumeSettings())
    assert nearer["index"] == 12
    assert set(found["scores"]) == {40, 35, 25, 5}


def test_the_seed_component_is_kept_and_a_detached_one_dropped():
    masks = {k: disk((128, 128), 10) for k in range(10, 15)}
    masks[20] = disk((40, 40), 5)  # not touching the run of the seed
    kept = largest_run(masks, seed=12)
    assert sorted(kept) == list(range(10, 15))


def test_the_body_extent_ignores_dark_background_and_noise():
    volume = np.random.default_rng(0).normal(0, 1, (1, 40, 40, 50)).astype(np.float32)  # background noise
    volume[0, 5:35, 5:35, 12:41] += 100  # the body, slices 12..40 along the last axis
    assert body_extent(torch.as_tensor(volume), 2) == (12, 40)


def test_mask_box_is_row0_col0_row1_col1():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[50:60, 70:90] = True
    assert mask_box(mask) == (50, 70, 59, 89)
