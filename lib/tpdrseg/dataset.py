"""Diabetic-retinopathy lesion data: SYNTHETIC lesions on REAL fundus backgrounds, and readers for IDRiD and DDR.

No real DR lesion annotation can be had offline, so `build_dataset` paints lesions on augmented copies of a real
colour fundus photograph (scikit-image's `retina.jpg`: a normal left eye, CC0, Wikimedia Commons; the only real
colour fundus photograph found in the package registries) and keeps an exact mask of every painted lesion. The
images are for exercising and smoke-training the text-prompted pipeline; numbers measured on them say nothing about
real DR images. `manifest.json` says so. With the real data sets, `read_idrid` / `read_ddr` + `load_case` give the same
(image, 4-class masks) pairs.

Classes (channel order of every mask array = label - 1 in configs/lesions.yaml): microaneurysms (MA),
haemorrhages (HE), hard exudates (EX), soft exudates (SE).

Backgrounds (`augment_background`): the source is resized to 640 px, then one affine warp to `size` (512) per image:
rotation +-20 deg about the image centre, optional left/right mirror (a right eye) and, rarely, up/down mirror, zoom
1.0-1.35 with a random shift (the field of view may be cut at the borders, as in IDRiD), then colour: per-channel
gains, gamma, brightness, a smooth illumination gradient, mild blur or sharpening and sensor noise. The optic disc,
fovea and field of view are found once on the source (brightest and darkest smooth regions, threshold) and moved with
the same warp; 1 disc diameter (DD) = disc-fovea distance / 2.6 (the fovea lies about 2.5-3 DD temporal to the disc),
and 1 DD = 1600 um sets the micrometre scale (about 25 um per pixel at 512 px).

Lesions (`LesionPainter`), sizes from the literature cited in configs/lesions.yaml:

* microaneurysms: round dark-red dots, 40-125 um (about 1/40-1/13 DD), sharp edges, within 3.5 DD of the fovea,
  never within 1 DD of the disc centre nor on a large vessel;
* haemorrhages: dot (round, 125-300 um), blot (irregular union of 2-5 ellipses, 300-1000 um, slightly soft edges) and
  flame (tapered streak 400-1300 um long, 1/5-1/3 as wide, feathered ends, long axis along the local nerve-fibre
  direction: radial from the disc, arcing around the fovea);
* hard exudates: bright yellow-white waxy flecks (30-220 um) with sharp edges, in clusters or circinate rings
  (0.4-1.3 DD radius) within 0.6-3 DD of the fovea, sometimes with a confluent plaque;
* soft exudates: pale white-grey fluffy patches, 1/4-1/2 DD, irregular outline, feathered edges, within 0.8-3 DD of
  the disc along the upper and lower vascular arcades.

Counts per image depend on a drawn severity (mild / moderate / severe) and follow IDRiD's presence rates (every image
has MAs, nearly all haemorrhages and exudates, about half cotton-wool spots). Colour is blended towards a per-lesion
target (dark red: blood absorbs green and blue; yellow-white: lipid; grey-white: swollen nerve fibres) with an opacity
profile; the mask is where the opacity reaches half its peak, and a lesion painted later removes its pixels from the
other classes' masks, so masks are exact and mutually exclusive. Everything is drawn from one
`numpy.random.default_rng(seed)` per image: the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

CLASSES = ("microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates")
ABBREVIATIONS = ("MA", "HE", "EX", "SE")
DD_UM = 1600.0  # optic disc diameter in micrometres
SYNTHETIC_NOTICE = ("SYNTHETIC lesions painted on REAL fundus backgrounds (augmented copies of scikit-image's "
                    "retina.jpg, a normal eye). Lesion masks are exact for the painted lesions; these are not real "
                    "diabetic-retinopathy images and results on them do not measure performance on real data.")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- background source
@dataclass
class Anatomy:
    disc: Tuple[float, float]  # (x, y) pixels
    fovea: Tuple[float, float]
    dd: float  # disc diameter in pixels

    @property
    def um_per_px(self) -> float:
        return DD_UM / self.dd


def source_background() -> Tuple[np.ndarray, str]:
    """(RGB uint8 image, description): scikit-image's retina.jpg (found through importlib.metadata), else the repo's
    sample-data/retina.png (the same photograph at 512 px)."""
    from lib.tpdrseg.model.weights_io import packaged_file

    path = packaged_file("scikit-image", "skimage/data/retina.jpg")
    if path is not None:
        import importlib.metadata
        desc = f"scikit-image {importlib.metadata.version('scikit-image')}: skimage/data/retina.jpg (CC0 1.0)"
    else:
        path = REPO_ROOT / "sample-data" / "retina.png"
        desc = "sample-data/retina.png (scikit-image retina.jpg, CC0 1.0)"
    return np.asarray(Image.open(path).convert("RGB")), desc


def field_of_view(rgb: np.ndarray) -> np.ndarray:
    """Camera field of view: max(R, G, B) > 20, largest component, holes filled (as sample-data's retina label)."""
    fov = rgb.max(axis=2) > 20
    lab, n = ndi.label(fov)
    if n > 1:
        fov = lab == (np.argmax(ndi.sum(fov, lab, range(1, n + 1))) + 1)
    return ndi.binary_fill_holes(fov)


def detect_anatomy(rgb: np.ndarray, fov: np.ndarray) -> Anatomy:
    """Optic disc = brightest smooth spot, fovea = darkest smooth spot 2-3.5 DD away from it (green channel)."""
    h, w = fov.shape
    s = w / 64.0
    inner = ndi.binary_erosion(fov, iterations=max(1, int(w / 40)))
    bright = ndi.gaussian_filter(rgb.astype(np.float32).sum(2), s)
    bright[~inner] = -np.inf
    dy, dx = np.unravel_index(np.argmax(bright), bright.shape)
    green = ndi.gaussian_filter(rgb[..., 1].astype(np.float32), 1.5 * s)
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(xx - dx, yy - dy)
    # a 45-degree field is ~ 7-9 DD across: look 2-3.5 DD from the disc, taking 1 DD ~ FOV width / 8
    fov_width = np.ptp(np.nonzero(fov.any(0))[0]) + 1
    ring = inner & (dist > 2.0 * fov_width / 8) & (dist < 3.5 * fov_width / 8)
    green[~ring] = np.inf
    fy, fx = np.unravel_index(np.argmin(green), green.shape)
    dd = float(np.hypot(fx - dx, fy - dy)) / 2.6
    return Anatomy(disc=(float(dx), float(dy)), fovea=(float(fx), float(fy)), dd=dd)


def augment_background(src: np.ndarray, src_fov: np.ndarray, src_anat: Anatomy, rng: np.random.Generator,
                       size: int = 512) -> Tuple[np.ndarray, np.ndarray, Anatomy, Dict]:
    """One augmented background: (RGB float32 in [0, 1], FOV bool, moved anatomy, the drawn parameters)."""
    h, w = src_fov.shape
    angle = float(rng.uniform(-20, 20))
    flip_lr = bool(rng.random() < 0.5)
    flip_ud = bool(rng.random() < 0.15)
    zoom = float(rng.uniform(1.0, 1.35))
    shift = rng.uniform(-1, 1, size=2) * (zoom - 1.0) * 0.5 * size
    # output (x, y) -> source (x, y): centre, undo zoom/shift, rotate, flip, scale to source
    c_out = (size - 1) / 2.0
    th = math.radians(angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    flip = np.diag([-1.0 if flip_lr else 1.0, -1.0 if flip_ud else 1.0])
    scale = np.diag([(w - 1) / (size - 1), (h - 1) / (size - 1)]) / zoom
    a = scale @ flip @ rot  # out offset (x, y) -> source offset (x, y)
    c_src = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    offset = c_src - a @ (np.array([c_out, c_out]) + shift)
    # scipy works in (row, col) = (y, x)
    a_rc = a[::-1, ::-1]
    off_rc = offset[::-1]
    img = np.stack([ndi.affine_transform(src[..., ch].astype(np.float32) / 255.0, a_rc, off_rc,
                                         output_shape=(size, size), order=1, mode="constant") for ch in range(3)], -1)
    fov = ndi.affine_transform(src_fov.astype(np.float32), a_rc, off_rc, output_shape=(size, size), order=1) > 0.5
    fov = ndi.binary_erosion(fov, iterations=1)
    inv = np.linalg.inv(a)

    def move(p):
        q = inv @ (np.asarray(p) - offset)
        return float(q[0]), float(q[1])

    anat = Anatomy(disc=move(src_anat.disc), fovea=move(src_anat.fovea), dd=src_anat.dd / abs(np.linalg.det(a)) ** 0.5)
    # colour and acquisition variation
    gains = rng.uniform([0.85, 0.75, 0.7], [1.15, 1.25, 1.35]).astype(np.float32)
    gamma = float(rng.uniform(0.8, 1.25))
    bright = float(rng.uniform(0.85, 1.15))
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    g_dir = rng.normal(size=2)
    g_dir /= np.linalg.norm(g_dir) + 1e-9
    g_amp = float(rng.uniform(0.0, 0.25))
    illum = 1.0 + g_amp * (xx * g_dir[0] + yy * g_dir[1]) - float(rng.uniform(0, 0.3)) * (xx ** 2 + yy ** 2)
    img = np.clip(img * gains, 0, 1) ** gamma * bright * illum[..., None]
    blur = float(rng.uniform(-0.6, 0.8))
    if blur > 0.2:
        img = ndi.gaussian_filter(img, (blur, blur, 0))
    elif blur < -0.2:  # unsharp mask
        img = img + 0.6 * (img - ndi.gaussian_filter(img, (1.0, 1.0, 0)))
    img = img + rng.normal(0, float(rng.uniform(0.003, 0.012)), img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) * fov[..., None]
    params = {"angle_deg": round(angle, 2), "flip_lr": flip_lr, "flip_ud": flip_ud, "zoom": round(zoom, 3),
              "gains": [round(float(g), 3) for g in gains], "gamma": round(gamma, 3)}
    return img.astype(np.float32), fov, anat, params


def vessel_map(img: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Large dark vessels: black top-hat of the green channel, strongest 8% of the field of view."""
    g = ndi.gaussian_filter(img[..., 1], 1.0)
    size = max(7, int(round(img.shape[0] / 45)))
    tophat = ndi.grey_closing(g, size=(size, size)) - g
    thr = np.quantile(tophat[fov], 0.92) if fov.any() else np.inf
    return ndi.binary_dilation((tophat > thr) & fov, iterations=1)


# ------------------------------------------------------------------------------------------------------- lesions
def _disk_profile(dist: np.ndarray, radius: float, softness: float) -> np.ndarray:
    """1 inside `radius`, falling smoothly to 0 over `softness` pixels (a logistic edge)."""
    return 1.0 / (1.0 + np.exp(np.clip((dist - radius) / max(softness, 1e-3) * 4.0, -60, 60)))


class LesionPainter:
    """Paints lesions into `img` (H, W, 3 float) and keeps exact masks (4, H, W) bool."""

    def __init__(self, img: np.ndarray, fov: np.ndarray, anat: Anatomy, rng: np.random.Generator):
        self.img, self.fov, self.anat, self.rng = img, fov, anat, rng
        self.h, self.w = fov.shape
        self.masks = np.zeros((len(CLASSES), self.h, self.w), bool)
        self.inside = ndi.binary_erosion(fov, iterations=max(2, int(self.w / 60)))
        self.vessels = vessel_map(img, fov)
        yy, xx = np.mgrid[: self.h, : self.w]
        self.disc_dist = np.hypot(xx - anat.disc[0], yy - anat.disc[1]) / anat.dd
        self.fovea_dist = np.hypot(xx - anat.fovea[0], yy - anat.fovea[1]) / anat.dd
        self.records: List[Dict] = []

    def px(self, um: float) -> float:
        return um / self.anat.um_per_px

    # where lesions may go ------------------------------------------------------------------------------------------
    def _sample_point(self, allowed: np.ndarray) -> Optional[Tuple[float, float]]:
        ys, xs = np.nonzero(allowed)
        if len(ys) == 0:
            return None
        i = self.rng.integers(len(ys))
        return float(xs[i] + self.rng.uniform(-0.5, 0.5)), float(ys[i] + self.rng.uniform(-0.5, 0.5))

    def _fibre_direction(self, x: float, y: float) -> float:
        """Angle (radians) of the nerve fibres at (x, y): radial from the disc, arcing around the fovea."""
        dx, dy = x - self.anat.disc[0], y - self.anat.disc[1]
        fx, fy = x - self.anat.fovea[0], y - self.anat.fovea[1]
        rd, rf = math.hypot(dx, dy) + 1e-6, math.hypot(fx, fy) + 1e-6
        radial = np.array([dx / rd, dy / rd])
        tangential = np.array([-fy / rf, fx / rf])
        if tangential @ radial < 0:
            tangential = -tangential
        wgt = rf / (rf + rd)
        v = wgt * radial + (1 - wgt) * tangential
        return math.atan2(v[1], v[0])

    # painting ------------------------------------------------------------------------------------------------------
    def _paint(self, cls: int, x0: int, y0: int, alpha: np.ndarray, colour: np.ndarray, peak: float,
               record: Dict) -> bool:
        """Blend `colour` (absolute RGB or per-pixel (h, w, 3)) with opacity `peak * alpha` in a window at (x0, y0)."""
        h, w = alpha.shape
        x1, y1 = x0 + w, y0 + h
        if x0 < 0 or y0 < 0 or x1 > self.w or y1 > self.h:
            return False
        core = alpha >= 0.5
        if not core.any() or not self.inside[y0:y1, x0:x1][core].all():
            return False
        a = (peak * alpha)[..., None]
        win = self.img[y0:y1, x0:x1]
        self.img[y0:y1, x0:x1] = win * (1 - a) + colour * a
        for other in range(len(CLASSES)):
            if other != cls:
                self.masks[other, y0:y1, x0:x1] &= ~core
        self.masks[cls, y0:y1, x0:x1] |= core
        record.update(cls=CLASSES[cls], bbox=[int(x0), int(y0), int(x1), int(y1)], pixels=int(core.sum()))
        self.records.append(record)
        return True

    def _window(self, cx: float, cy: float, half: float):
        half = int(math.ceil(half)) + 2
        x0, y0 = int(math.floor(cx)) - half, int(math.floor(cy)) - half
        yy, xx = np.mgrid[y0: y0 + 2 * half + 1, x0: x0 + 2 * half + 1].astype(np.float32)
        return x0, y0, xx - cx, yy - cy

    def _free(self, x0: int, y0: int, alpha: np.ndarray, margin: int = 2) -> bool:
        h, w = alpha.shape
        if x0 < 0 or y0 < 0 or x0 + w > self.w or y0 + h > self.h:
            return False
        taken = self.masks.any(0)[y0: y0 + h, x0: x0 + w]
        return not (ndi.binary_dilation(alpha >= 0.5, iterations=margin) & taken).any()

    def _red(self, x0: int, y0: int, alpha: np.ndarray, darkness: float) -> np.ndarray:
        """Dark red relative to the local background: blood absorbs green and blue much more than red."""
        win = self.img[y0: y0 + alpha.shape[0], x0: x0 + alpha.shape[1]]
        return win * np.array([1 - 0.3 * darkness, 1 - 0.85 * darkness, 1 - 0.8 * darkness], np.float32)

    def microaneurysm(self) -> bool:
        allowed = self.inside & (self.fovea_dist < 3.5) & (self.disc_dist > 1.0) & ~self.vessels
        for _ in range(20):
            p = self._sample_point(allowed)
            if p is None:
                return False
            d_um = float(self.rng.uniform(40, 125))
            r = max(self.px(d_um) / 2, 0.9)
            x0, y0, dx, dy = self._window(*p, r + 2)
            alpha = _disk_profile(np.hypot(dx, dy), r, 0.35)
            if self._free(x0, y0, alpha, 2):
                col = self._red(x0, y0, alpha, float(self.rng.uniform(0.55, 0.8)))
                return self._paint(0, x0, y0, alpha, col, 1.0, {"kind": "microaneurysm", "diameter_um": round(d_um)})
        return False

    def haemorrhage(self, kind: str) -> bool:
        allowed = self.inside & (self.disc_dist > 0.8) & (self.fovea_dist < 4.5) & (self.fovea_dist > 0.3)
        for _ in range(20):
            p = self._sample_point(allowed)
            if p is None:
                return False
            if kind == "dot":
                d_um = float(self.rng.uniform(125, 300))
                r = self.px(d_um) / 2
                x0, y0, dx, dy = self._window(*p, r + 3)
                alpha = _disk_profile(np.hypot(dx, dy), r, 0.6)
                extra = {"diameter_um": round(d_um)}
            elif kind == "blot":
                d_um = float(self.rng.uniform(300, 1000))
                r = self.px(d_um) / 2
                x0, y0, dx, dy = self._window(*p, 1.6 * r + 4)
                field = np.zeros_like(dx)
                for _k in range(int(self.rng.integers(2, 6))):
                    ox, oy = self.rng.normal(0, 0.35 * r, 2)
                    ax, ay = r * self.rng.uniform(0.4, 0.8, 2)
                    th = self.rng.uniform(0, math.pi)
                    u = ((dx - ox) * math.cos(th) + (dy - oy) * math.sin(th)) / ax
                    v = (-(dx - ox) * math.sin(th) + (dy - oy) * math.cos(th)) / ay
                    field = np.maximum(field, 1.0 - np.hypot(u, v))
                alpha = ndi.gaussian_filter(np.clip(field * 3, 0, 1), max(0.6, 0.06 * r))
                extra = {"diameter_um": round(d_um)}
            else:  # flame
                length_um = float(self.rng.uniform(400, 1300))
                half_len = self.px(length_um) / 2
                half_wid = half_len * float(self.rng.uniform(0.2, 0.33))
                th = self._fibre_direction(*p)
                x0, y0, dx, dy = self._window(*p, half_len + 4)
                u = (dx * math.cos(th) + dy * math.sin(th)) / half_len
                v = (-dx * math.sin(th) + dy * math.cos(th)) / half_wid
                taper = np.clip(1.0 - 0.45 * (u + 1), 0.25, 1.0)  # wider at one end (towards the disc)
                field = 1.0 - np.hypot(u, v / taper)
                alpha = ndi.gaussian_filter(np.clip(field * 2.5, 0, 1), max(0.7, 0.15 * half_wid))
                streaks = 1.0 - 0.25 * (np.sin(v * 6.0 + self.rng.uniform(0, 6)) > 0.6)
                alpha = alpha * streaks
                extra = {"length_um": round(length_um), "angle_deg": round(math.degrees(th), 1)}
            if self._free(x0, y0, alpha, 2):
                col = self._red(x0, y0, alpha, float(self.rng.uniform(0.5, 0.75)))
                return self._paint(1, x0, y0, alpha, col, 1.0, {"kind": f"{kind} haemorrhage", **extra})
        return False

    def exudate_cluster(self) -> int:
        allowed = self.inside & (self.fovea_dist > 0.6) & (self.fovea_dist < 3.0) & (self.disc_dist > 1.2)
        centre = self._sample_point(allowed)
        if centre is None:
            return 0
        ring = bool(self.rng.random() < 0.4)
        radius = self.anat.dd * float(self.rng.uniform(0.4, 1.3))
        n = int(self.rng.integers(8, 40)) if ring else int(self.rng.integers(4, 25))
        yellow = np.array([1.0, 0.93, 0.55], np.float32) * float(self.rng.uniform(0.9, 1.0))
        painted = 0
        if not ring and self.rng.random() < 0.3:  # a confluent plaque at the cluster centre
            painted += self._exudate(centre, float(self.rng.uniform(250, 600)), yellow, plaque=True)
        for _ in range(n):
            if ring:
                t = self.rng.uniform(0, 2 * math.pi)
                rr = radius * self.rng.normal(1.0, 0.08)
                p = (centre[0] + rr * math.cos(t), centre[1] + rr * math.sin(t))
            else:
                p = tuple(np.asarray(centre) + self.rng.normal(0, 0.35 * radius, 2))
            painted += self._exudate(p, float(self.rng.uniform(30, 220)), yellow, plaque=False)
        return painted

    def _exudate(self, p, d_um: float, yellow: np.ndarray, plaque: bool) -> int:
        r = max(self.px(d_um) / 2, 0.9)
        x0, y0, dx, dy = self._window(p[0], p[1], 1.5 * r + 2)
        th = self.rng.uniform(0, math.pi)
        e = self.rng.uniform(0.6, 1.0)
        u = (dx * math.cos(th) + dy * math.sin(th))
        v = (-dx * math.sin(th) + dy * math.cos(th)) / e
        dist = np.hypot(u, v)
        if plaque:
            ang = np.arctan2(v, u)
            dist = dist / (1 + 0.25 * np.sin(3 * ang + self.rng.uniform(0, 6)))
        alpha = _disk_profile(dist, r, 0.35)
        if not self._free(x0, y0, alpha, 1):
            return 0
        win = self.img[y0: y0 + alpha.shape[0], x0: x0 + alpha.shape[1]]
        col = np.clip(0.25 * win + 0.85 * yellow, 0, 1)  # waxy, keeps a little of the local tint
        ok = self._paint(2, x0, y0, alpha, col, float(self.rng.uniform(0.75, 0.95)),
                         {"kind": "hard exudate plaque" if plaque else "hard exudate", "diameter_um": round(d_um)})
        return int(ok)

    def cotton_wool_spot(self) -> bool:
        allowed = self.inside & (self.disc_dist > 0.8) & (self.disc_dist < 3.0) & (self.fovea_dist > 1.0)
        # along the upper and lower arcades: away from the disc-fovea line
        yy, xx = np.mgrid[: self.h, : self.w]
        ax = np.array(self.anat.fovea) - np.array(self.anat.disc)
        ax /= np.linalg.norm(ax) + 1e-9
        off_axis = np.abs(-(xx - self.anat.disc[0]) * ax[1] + (yy - self.anat.disc[1]) * ax[0]) / self.anat.dd
        allowed &= off_axis > 0.5
        for _ in range(20):
            p = self._sample_point(allowed)
            if p is None:
                return False
            d_um = DD_UM * float(self.rng.uniform(0.25, 0.5))
            r = self.px(d_um) / 2
            th = self._fibre_direction(*p)
            x0, y0, dx, dy = self._window(*p, 1.8 * r + 4)
            u = (dx * math.cos(th) + dy * math.sin(th)) / (r * float(self.rng.uniform(1.0, 1.4)))
            v = (-dx * math.sin(th) + dy * math.cos(th)) / (r * float(self.rng.uniform(0.6, 0.9)))
            ang = np.arctan2(v, u)
            wobble = (1 + 0.18 * np.sin(3 * ang + self.rng.uniform(0, 6))
                      + 0.1 * np.sin(5 * ang + self.rng.uniform(0, 6)))
            field = np.clip((1.0 - np.hypot(u, v) / wobble) * 2.0, 0, 1)
            alpha = ndi.gaussian_filter(field, max(1.0, 0.3 * r))  # fluffy, feathered edge
            alpha = alpha / max(alpha.max(), 1e-6)
            if self._free(x0, y0, alpha, 2):
                win = self.img[y0: y0 + alpha.shape[0], x0: x0 + alpha.shape[1]]
                grey = np.array([0.93, 0.9, 0.86], np.float32) * float(self.rng.uniform(0.85, 1.0))
                col = np.clip(0.3 * win + 0.75 * grey, 0, 1)
                return self._paint(3, x0, y0, alpha, col, float(self.rng.uniform(0.55, 0.8)),
                                   {"kind": "cotton-wool spot", "diameter_um": round(d_um)})
        return False


SEVERITY = {"mild": 0, "moderate": 1, "severe": 2}


def draw_counts(rng: np.random.Generator) -> Tuple[str, Dict[str, int]]:
    """Severity and per-class targets. Presence rates as in IDRiD's 81 images (MA 100%, HE ~99%, EX 100%, SE ~49%),
    made a little lower so that some images have no lesion of a class (empty masks for that prompt)."""
    severity = str(rng.choice(list(SEVERITY), p=[0.35, 0.4, 0.25]))
    s = SEVERITY[severity]
    counts = {
        "microaneurysms": int(1 + rng.poisson([5, 14, 25][s])),
        "haemorrhages": int(rng.random() < 0.9) * int(1 + rng.poisson([2, 6, 14][s])),
        "hard_exudates": int(rng.random() < 0.85) * int(1 + rng.poisson([0.3, 1.0, 2.0][s])),  # clusters
        "soft_exudates": int(rng.random() < [0.3, 0.5, 0.7][s]) * int(1 + rng.poisson([0.5, 1.0, 2.0][s])),
    }
    return severity, counts


def synthesize_image(src: np.ndarray, src_fov: np.ndarray, src_anat: Anatomy, seed: int, size: int = 512) -> Dict:
    """One image: {'image' (size, size, 3) uint8, 'masks' (4, size, size) bool, 'fov', 'info', 'background' (the
    same image before the lesions)}; deterministic."""
    rng = np.random.default_rng(seed)
    img, fov, anat, bg = augment_background(src, src_fov, src_anat, rng, size)
    severity, targets = draw_counts(rng)
    background = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    painter = LesionPainter(img.copy(), fov, anat, rng)
    # large lesions first, so small ones fill the gaps
    for _ in range(targets["soft_exudates"]):
        painter.cotton_wool_spot()
    kinds = rng.choice(["dot", "blot", "flame"], size=targets["haemorrhages"], p=[0.45, 0.3, 0.25])
    for kind in kinds:
        painter.haemorrhage(str(kind))
    for _ in range(targets["hard_exudates"]):
        painter.exudate_cluster()
    for _ in range(targets["microaneurysms"]):
        painter.microaneurysm()
    image = np.clip(np.round(painter.img * 255), 0, 255).astype(np.uint8)
    masks = painter.masks
    lab = [ndi.label(m, structure=np.ones((3, 3)))[1] for m in masks]
    info = {"seed": int(seed), "severity": severity, "background": bg,
            "anatomy": {"disc_xy": [round(v, 1) for v in anat.disc], "fovea_xy": [round(v, 1) for v in anat.fovea],
                        "disc_diameter_px": round(anat.dd, 1), "um_per_px": round(anat.um_per_px, 2)},
            "painted": {c: sum(r["cls"] == c for r in painter.records) for c in CLASSES},
            "components": {c: int(n) for c, n in zip(CLASSES, lab)},
            "pixels": {c: int(m.sum()) for c, m in zip(CLASSES, masks)},
            "lesions": painter.records}
    return {"image": image, "background": background, "masks": masks, "fov": fov, "info": info}


def build_dataset(n_train: int = 60, n_test: int = 20, size: int = 512, seed: int = 0) -> Dict:
    """Arrays {'train_images' (N, size, size, 3) uint8, 'train_masks' (N, 4, size, size) uint8, 'train_fov', same for
    'test_'} and the manifest. Image i of a split uses seed (seed, split, i) through numpy's SeedSequence."""
    src, desc = source_background()
    small = np.asarray(Image.fromarray(src).resize((640, 640), Image.LANCZOS))
    src_fov = field_of_view(small)
    src_anat = detect_anatomy(small, src_fov)
    arrays: Dict[str, np.ndarray] = {}
    manifest = {"notice": SYNTHETIC_NOTICE, "synthetic_lesions": True, "real_background": True,
                "background_source": desc, "source_anatomy_640px": dataclasses.asdict(src_anat),
                "classes": list(CLASSES), "abbreviations": list(ABBREVIATIONS), "mask_channel_order": list(CLASSES),
                "size": size, "seed": seed, "splits": {}, "generator": "lib/tpdrseg/dataset.py"}
    for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        imgs, masks, fovs, infos = [], [], [], []
        for i in range(n):
            s = int(np.random.SeedSequence([seed, split_id, i]).generate_state(1)[0])
            out = synthesize_image(small, src_fov, src_anat, s, size)
            imgs.append(out["image"])
            masks.append(out["masks"].astype(np.uint8))
            fovs.append(out["fov"])
            infos.append({"index": i, **out["info"]})
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_masks"] = np.stack(masks)
        arrays[f"{split}_fov"] = np.stack(fovs)
        manifest["splits"][split] = {
            "n": n, "images": infos,
            "images_with_class": {c: int(sum(inf["pixels"][c] > 0 for inf in infos)) for c in CLASSES},
            "lesion_components": {c: int(sum(inf["components"][c] for inf in infos)) for c in CLASSES}}
    return {"arrays": arrays, "manifest": manifest}


def save_dataset(data: Dict, out_dir: str | os.PathLike) -> Tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz, man = out / "fundus_lesions.npz", out / "manifest.json"
    # np.savez stamps the current time into the zip: write the same .npz layout with a fixed date instead
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in data["arrays"].items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    manifest = dict(data["manifest"], npz_sha256=hashlib.sha256(npz.read_bytes()).hexdigest())
    with open(man, "w") as f:
        json.dump(manifest, f, indent=1)
    return npz, man


def ensure_dataset(out_dir: str | os.PathLike) -> Path:
    """Build the default data set (60 train + 20 test, 512 px, seed 0; about 15 s) into `out_dir` unless it is there.
    The data is generated, never committed, so a fresh clone (and CI) builds it on first use. Written to a sibling
    folder and renamed, so an interrupted build never leaves a half-written data set behind."""
    out = Path(out_dir)
    if (out / "fundus_lesions.npz").is_file() and (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.building-{os.getpid()}")
    print(f"building the synthetic fundus-lesion data into {out} (about 15 s, once)", flush=True)
    save_dataset(build_dataset(), tmp)
    if out.exists():  # e.g. an empty folder, or one holding a preview: move the two files in, npz last
        os.replace(tmp / "manifest.json", out / "manifest.json")
        os.replace(tmp / "fundus_lesions.npz", out / "fundus_lesions.npz")
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return out


def load_dataset(out_dir: str | os.PathLike, split: str = "train") -> Tuple[np.ndarray, np.ndarray, Dict]:
    """(images (N, H, W, 3) uint8, masks (N, 4, H, W) uint8, manifest) of a built data set."""
    out = Path(out_dir)
    if not (out / "fundus_lesions.npz").is_file():
        raise FileNotFoundError(f"{out}: no fundus_lesions.npz; build it with `python scripts/build_fundus_data.py "
                                f"--out {out}` (or call ensure_dataset)")
    with np.load(out / "fundus_lesions.npz") as z:
        images, masks = z[f"{split}_images"], z[f"{split}_masks"]
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    if not manifest.get("synthetic_lesions"):
        raise ValueError(f"{out}: manifest lacks the synthetic-lesion statement")
    return images, masks, manifest


# ------------------------------------------------------------------------------------------------------- real data
@dataclass
class FundusCase:
    case_id: str
    image: Path
    masks: Dict[str, Optional[Path]]  # class -> file (None: no lesion of that class annotated)


IDRID_DIRS = {"microaneurysms": ("1. Microaneurysms", "MA"), "haemorrhages": ("2. Haemorrhages", "HE"),
              "hard_exudates": ("3. Hard Exudates", "EX"), "soft_exudates": ("4. Soft Exudates", "SE")}
IDRID_SPLITS = {"train": "a. Training Set", "test": "b. Testing Set"}


def read_idrid(root: str | os.PathLike, split: str = "train") -> List[FundusCase]:
    """IDRiD "A. Segmentation": `1. Original Images/a. Training Set/IDRiD_01.jpg` and
    `2. All Segmentation Groundtruths/a. Training Set/1. Microaneurysms/IDRiD_01_MA.tif` (2. Haemorrhages _HE,
    3. Hard Exudates _EX, 4. Soft Exudates _SE; a missing file = no such lesion). `root` is the "A. Segmentation"
    folder or the folder holding it; split "train" or "test"."""
    root = Path(root)
    if (root / "A. Segmentation").is_dir():
        root = root / "A. Segmentation"
    img_dir = root / "1. Original Images" / IDRID_SPLITS[split]
    gt_dir = root / "2. All Segmentation Groundtruths" / IDRID_SPLITS[split]
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: not an IDRiD segmentation folder")
    cases = []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif")):
        masks = {}
        for cls, (folder, abbr) in IDRID_DIRS.items():
            found = [p for p in (gt_dir / folder).glob(f"{img.stem}_{abbr}.*")] if (gt_dir / folder).is_dir() else []
            masks[cls] = found[0] if found else None
        cases.append(FundusCase(img.stem, img, masks))
    return cases


def read_ddr(root: str | os.PathLike, split: str = "train") -> List[FundusCase]:
    """DDR `lesion_segmentation/{train,valid,test}/image/<id>.jpg` + `label/{EX,HE,MA,SE}/<id>.tif`. `root` is the
    lesion_segmentation folder or the folder holding it."""
    root = Path(root)
    if (root / "lesion_segmentation").is_dir():
        root = root / "lesion_segmentation"
    split_dir = root / split
    if not (split_dir / "image").is_dir():
        raise FileNotFoundError(f"{split_dir}: not a DDR lesion_segmentation split")
    cases = []
    for img in sorted(p for p in (split_dir / "image").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        masks = {}
        for cls, abbr in zip(CLASSES, ABBREVIATIONS):
            found = sorted((split_dir / "label" / abbr).glob(f"{img.stem}.*"))
            masks[cls] = found[0] if found else None
        cases.append(FundusCase(img.stem, img, masks))
    return cases


def _read_mask(path: Path) -> np.ndarray:
    try:
        arr = np.asarray(Image.open(path))
    except Exception:  # noqa: BLE001 - some TIFF compressions need tifffile
        import tifffile
        arr = tifffile.imread(path)
    arr = np.asarray(arr)
    return (arr.max(axis=-1) if arr.ndim == 3 else arr) > 0


def load_case(case: FundusCase, size: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), masks bool (4, H, W)); resized to size = (width, height) when given (image LANCZOS;
    masks by area fraction >= 0.25, so that tiny microaneurysms survive downsampling)."""
    image = Image.open(case.image).convert("RGB")
    w, h = image.size
    masks = np.zeros((len(CLASSES), h, w), bool)
    for i, cls in enumerate(CLASSES):
        if case.masks.get(cls) is not None:
            m = _read_mask(case.masks[cls])
            if m.shape != (h, w):
                raise ValueError(f"{case.masks[cls]}: mask {m.shape} does not match image {(h, w)}")
            masks[i] = m
    if size is not None and tuple(size) != (w, h):
        image = image.resize(tuple(size), Image.LANCZOS)
        masks = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize(tuple(size), Image.BOX)) >= 0.25
                          for m in masks])
    return np.asarray(image), masks

