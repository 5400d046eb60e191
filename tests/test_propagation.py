"""Prompt propagation (SAM^Med Algorithm 1): its stop criterion and both directions, on a volume where the
answer is known. The segmenter here is a plain intensity threshold, so the test isolates the propagation logic.
(On the Colin27 thalamus with the learned prompt encoder the criterion alone does not stop: see the issue note.)"""

import numpy as np

from lib.sammed.propagation import propagate


def test_propagation_follows_the_structure_both_ways_and_stops_where_intensity_changes():
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 0.01, size=(30, 40, 40)).astype(np.float32)  # (slices, rows, cols)
    rr, cc = np.ogrid[:40, :40]
    disc = (rr - 20) ** 2 + (cc - 20) ** 2 <= 8 ** 2
    volume[10:21][:, disc] += 1.0  # a bright cylinder on slices 10..20
    segment = lambda k, points: (volume[k] > 0.5).astype(np.float32)
    result = propagate(lambda k: volume[k], segment, {15: volume[15] > 0.5}, len(volume), rng, points=10, lam=1.0)
    assert sorted(result) == list(range(10, 21))
    assert all(((result[k] > 0.5) == disc).all() for k in result)
