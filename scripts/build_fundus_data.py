#!/usr/bin/env python
"""Build the SYNTHETIC diabetic-retinopathy lesion data on REAL fundus backgrounds (lib/tpdrseg/dataset.py).

    python scripts/build_fundus_data.py                  # 60 train + 20 held-out, 512 px, into data/fundus_lesions/
    python scripts/build_fundus_data.py --train 8 --test 4 --out /tmp/fl --seed 1
    python scripts/build_fundus_data.py --preview /tmp/preview.png   # also write a contact sheet with mask outlines

Source: scikit-image's `skimage/data/retina.jpg` (the installed wheel, found through importlib.metadata; CC0 1.0,
Wikimedia Commons "Fundus photograph of normal left eye"). Lesions (microaneurysms, haemorrhages, hard and soft
exudates) are painted on augmented copies with exact masks. Output (generated, not committed):
`fundus_lesions.npz` with `{train,test}_images` (N, S, S, 3) uint8, `{train,test}_masks` (N, 4, S, S) uint8 (channel
order MA, HE, EX, SE = configs/lesions.yaml label - 1), `{train,test}_fov` (N, S, S) bool; and `manifest.json`
(the SYNTHETIC notice, per-image seeds, severity, anatomy, every lesion painted, counts). Deterministic: the same
seed and parameters give byte-identical files (nothing depends on the clock; the build time is only printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from lib.tpdrseg import dataset as fl  # noqa: E402

OUTLINE = {0: (0, 255, 255), 1: (0, 0, 255), 2: (255, 255, 0), 3: (255, 0, 255)}


def preview(images: np.ndarray, masks: np.ndarray, path: str, n: int = 8) -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    tiles = []
    for img, m in zip(images[:n], masks[:n]):
        over = img.copy()
        for c in range(m.shape[0]):
            mc = m[c].astype(bool)
            over[mc & ~ndi.binary_erosion(mc)] = OUTLINE[c]
        tiles.append(np.concatenate([img, over], axis=1))
    rows = [np.concatenate(tiles[i: i + 2], axis=1) if i + 1 < len(tiles) else
            np.concatenate([tiles[i], np.zeros_like(tiles[i])], axis=1) for i in range(0, len(tiles), 2)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "data", "fundus_lesions"))
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", help="write a PNG contact sheet (image | mask outlines: MA cyan, HE blue, EX yellow, "
                                      "SE magenta) of the first training images")
    args = ap.parse_args(argv)
    start = time.time()
    data = fl.build_dataset(args.train, args.test, args.size, args.seed)
    npz, man = fl.save_dataset(data, args.out)
    for split in ("train", "test"):
        s = data["manifest"]["splits"][split]
        print(f"{split}: {s['n']} images; images with class {s['images_with_class']}; "
              f"lesion components {s['lesion_components']}")
    if args.preview:
        preview(data["arrays"]["train_images"], data["arrays"]["train_masks"], args.preview)
        print(f"preview: {args.preview}")
    print(f"wrote {npz} ({os.path.getsize(npz) / 2**20:.1f} MiB) and {man} in {time.time() - start:.1f} s")
    print(fl.SYNTHETIC_NOTICE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
