"""SAMauto prompt propagation (SAM^Med, Algorithm 1): from an annotated slice to its neighbours, no clicks.

Points drawn from the current slice's mask move to the next slice where the intensity there differs by less
than lambda times the standard deviation of the intensities inside the current mask; the SAMassist model segments
the next slice from those points; repeat, in both directions, until no point passes (the paper's stop criterion)
or the mask vanishes. Each annotated slice propagates on its own. The paper's text on how the runs are combined
is cut off; we average each slice's foreground probability over the runs that reached it and threshold at 0.5.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lib.sammed.samassist import sample_points


def propagate(slice_intensity: Callable[[int], np.ndarray], segment: Callable[[int, np.ndarray], np.ndarray],
              annotated: dict[int, np.ndarray], num_slices: int, rng: np.random.Generator,
              points: int = 10, lam: float = 1.0) -> dict[int, np.ndarray]:
    """Foreground probability per reached slice.

    slice_intensity(k): the (H, W) normalised intensities of slice k (what the criterion compares).
    segment(k, points_rc): (H, W) foreground probability of slice k from positive (row, col) points.
    annotated: slice index -> (H, W) bool mask, the seeds (kept as they are in the result).
    """
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for seed, seed_mask in annotated.items():
        for step in (1, -1):
            k, mask = seed, np.asarray(seed_mask, bool)
            while 0 <= k + step < num_slices and (k + step) not in annotated and mask.any():
                current, following = slice_intensity(k), slice_intensity(k + step)
                spread = float(current[mask].std())
                candidates = sample_points(mask, points, "uniform", rng)
                rows, cols = candidates[:, 0].astype(int), candidates[:, 1].astype(int)
                kept = candidates[np.abs(following[rows, cols] - current[rows, cols]) < lam * spread]
                if len(kept) == 0:
                    break
                probability = segment(k + step, kept)
                sums[k + step] = sums.get(k + step, 0) + probability
                counts[k + step] = counts.get(k + step, 0) + 1
                k, mask = k + step, probability > 0.5
    result = {k: sums[k] / counts[k] for k in sums}
    result.update({k: np.asarray(m, np.float32) for k, m in annotated.items()})
    return result
