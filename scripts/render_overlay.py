"""Render README overlays: real results of the infer task (the same code path as /infer) on sample data.

    .venv/bin/python scripts/render_overlay.py [--out docs/overlay.png]

Panels: a Slicer-style click on the head CT, a box on the Colin27 T1, a box on one nucleus. Green: the model's
mask outline; red: ground-truth outline; yellow: the prompt. Dice against the label is printed on each panel.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib.configs.sam import SAMConfig  # noqa: E402
from lib.core.evaluation import component_targets, dice  # noqa: E402
from lib.core.transforms import apply_intensity_range, compute_intensity_range, extract_slice  # noqa: E402
from lib.core.images import load_image  # noqa: E402

DATA = os.path.join(REPO, "sample-data")


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def panel(task, image_name: str, modality: str, axis, index, target, prompt: str, scale: int) -> Image.Image:
    path = os.path.join(DATA, image_name)
    image = load_image(path)
    r0, c0, r1, c1 = (int(v) for v in target.box)
    if prompt == "click":
        r, c = (int(v) for v in target.interior_point)
        request = {"foreground": [[c, r, index] if axis is not None else [c, r]], "background": []}
    else:
        request = {"roi": [c0, c1, r0, r1, index, index] if axis is not None else [c0, c1, r0, r1]}
    label_file, result = task({**request, "image": path, "modality": modality})
    label = load_image(label_file).array
    os.remove(label_file)
    predicted = extract_slice(label[:1], axis, index)[0].numpy() > 0

    rng = compute_intensity_range(image.array.numpy(), modality)
    grey = apply_intensity_range(extract_slice(image.array[:3], axis, index), rng).numpy()
    rgb = np.repeat(grey, 3, axis=0) if grey.shape[0] == 1 else grey
    rgb = (np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    rgb[outline(target.mask)] = (230, 40, 40)
    rgb[outline(predicted)] = (40, 230, 40)
    out = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    if prompt == "click":
        r, c = target.interior_point
        draw.ellipse([c * scale - 5, r * scale - 5, c * scale + 5, r * scale + 5], outline=(255, 230, 0), width=2)
    else:
        draw.rectangle([c0 * scale, r0 * scale, (c1 + 1) * scale, (r1 + 1) * scale], outline=(255, 230, 0), width=2)
    score = dice(predicted, target.mask)
    zoom = " zoom" if result["zoom"]["applied"] else ""
    draw.text((6, 6), f"{image_name} {prompt}{zoom}: Dice {score:.2f}", fill=(255, 255, 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "overlay.png"))
    args = parser.parse_args()
    config = SAMConfig()
    config.init("litemedsam", os.path.join(REPO, "apps", "model"), {})
    task = config.infer()["litemedsam"]

    def truth(name, axis, index):
        return extract_slice(load_image(os.path.join(DATA, "labels", "final", name)).array[:1], axis, index)[0].numpy().round()

    ct = component_targets(truth("head_ct.nii.gz", 2, 30), values=[2])[0]
    mri = component_targets(truth("colin27_t1.nii.gz", 2, 80), values=[77])[0]  # AAL 77: left thalamus
    nucleus = component_targets(truth("nuclei.png", None, None) > 0, min_area=40)[3]
    panels = [panel(task, "head_ct.nii.gz", "CT", 2, 30, ct, "click", 2),
              panel(task, "colin27_t1.nii.gz", "MR", 2, 80, mri, "box", 2),
              panel(task, "nuclei.png", "MR", None, None, nucleus, "box", 1)]
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), height), (0, 0, 0))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 8
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
