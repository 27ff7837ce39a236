"""Offline UKBench-style demo dataset built from photos bundled inside scikit-image.

Why: the project must run end to end (index, search, score) on a fresh machine with no network,
so it cannot rely on downloading UKBench. scikit-image's wheel ships a dozen photos; we turn each
photo (or several disjoint crops of the larger ones, so we get ~40 distinct objects) into 4 views
with seeded geometric + photometric transforms, and write them exactly like UKBench:
``ukbench00000.jpg`` ... (4 consecutive files = one object), plus ``groundtruth.tsv``.

Usage: ``python -m ris.demo_data [OUT_DIR] [--n-objects N] [--seed S]`` (default ``data/demo``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np

__all__ = ["list_source_photos", "make_views", "make_demo_dataset", "make_query_view", "SOURCES"]

FORMAT_VERSION = 1
JPEG_QUALITY = 90
VIEW_SIZE = (640, 480)  # (width, height), like UKBench

# (object name, skimage.data loader, crop box (x0, y0, x1, y1) in source pixels or None = whole).
# Crops cut from one photo never overlap each other, and a photo that is cropped is never also used
# whole, so no two objects share pixels (labels stay clean). Boxes are roughly 4:3 because views
# are 640x480 and a view keeps the central 4:3 part of its object. The order interleaves sources so
# that a small ``n_objects`` still gives visually different objects.
SOURCES: tuple[tuple[str, str, tuple[int, int, int, int] | None], ...] = (
    ("chelsea", "chelsea", None),
    ("astronaut_face", "astronaut", (112, 0, 340, 171)),
    ("coffee_cup", "coffee", (160, 0, 440, 210)),
    ("camera_man", "camera", (140, 50, 340, 200)),
    ("moto_front_wheel", "stereo_motorcycle", (490, 250, 741, 440)),
    ("hubble_top_left", "hubble_deep_field", (50, 40, 370, 280)),
    ("rocket", "rocket", None),
    ("retina_optic_disc", "retina", (90, 480, 420, 727)),
    ("ihc_top", "immunohistochemistry", (0, 0, 300, 225)),
    ("logo", "logo", None),
    ("coins", "coins", None),
    ("colorwheel", "colorwheel", None),
    ("page", "page", None),
    ("astronaut_badge", "astronaut", (20, 300, 270, 487)),
    ("moto_engine", "stereo_motorcycle", (280, 230, 490, 388)),
    ("brick", "brick", None),
    ("hubble_bright_star", "hubble_deep_field", (600, 380, 920, 620)),
    ("retina_macula", "retina", (560, 560, 890, 807)),
    ("moon_crater", "moon", (0, 0, 300, 225)),
    ("coffee_spoon", "coffee", (300, 215, 480, 350)),
    ("ihc_round_gland", "immunohistochemistry", (240, 300, 420, 435)),
    ("text", "text", None),
    ("astronaut_helmet", "astronaut", (275, 330, 512, 508)),
    ("moto_shelves", "stereo_motorcycle", (420, 0, 741, 230)),
    ("camera_tripod", "camera", (200, 300, 420, 465)),
    ("hubble_bottom_mid", "hubble_deep_field", (300, 620, 600, 845)),
    ("grass", "grass", None),
    ("clock", "clock", None),
    ("retina_upper_vessels", "retina", (780, 250, 1180, 550)),
    ("astronaut_shuttle", "astronaut", (342, 75, 512, 203)),
    ("moto_bench", "stereo_motorcycle", (0, 0, 300, 225)),
    ("hubble_spiral", "hubble_deep_field", (0, 330, 320, 570)),
    ("cell", "cell", None),
    ("ihc_lower_left", "immunohistochemistry", (0, 300, 200, 450)),
    ("moon_dark_patches", "moon", (130, 300, 386, 492)),
    ("gravel", "gravel", None),
    ("moto_rear_wheel", "stereo_motorcycle", (90, 250, 280, 392)),
    ("camera_buildings", "camera", (340, 100, 512, 229)),
    ("hubble_top_right", "hubble_deep_field", (620, 60, 940, 300)),
    ("retina_lower_vessels", "retina", (300, 1000, 700, 1300)),
    ("hubble_orange_galaxy", "hubble_deep_field", (640, 640, 960, 872)),
)


def _load_bundled(loader: str) -> np.ndarray:
    """Load one skimage.data photo as RGB uint8 (gray -> 3 channels, RGBA composited on white)."""
    from skimage import data  # local import: only this module needs scikit-image

    img = getattr(data, loader)()
    if loader == "stereo_motorcycle":
        img = img[0]  # left image only; the right one shows the same scene
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        img = np.clip(img + 0.5, 0, 255)
    return np.ascontiguousarray(img, dtype=np.uint8)


def _crop(img: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is None:
        return img
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(img[y0:y1, x0:x1])


def list_source_photos() -> list[tuple[str, np.ndarray]]:
    """Return ``(name, RGB uint8)`` for every demo object, in dataset order (see ``SOURCES``).

    Only loaders whose files ship in the scikit-image wheel are used (verified offline), so this
    never touches the network.
    """
    cache: dict[str, np.ndarray] = {}
    out: list[tuple[str, np.ndarray]] = []
    for name, loader, box in SOURCES:
        if loader not in cache:
            cache[loader] = _load_bundled(loader)
        out.append((name, _crop(cache[loader], box)))
    return out


def _cover_rect(h: int, w: int, aspect: float) -> tuple[float, float, float, float]:
    """Largest centred rectangle with the given width/height ratio: (cx, cy, half_w, half_h)."""
    if w / h > aspect:
        bh, bw = float(h), h * aspect
    else:
        bw, bh = float(w), w / aspect
    return w / 2.0, h / 2.0, bw / 2.0, bh / 2.0


def _view_quad(
    h: int, w: int, aspect: float, rng: np.random.Generator, identity: bool
) -> np.ndarray:
    """Source quadrilateral (TL, TR, BR, BL) that a view maps onto its output rectangle.

    Zoom >= 1 (a crop), a few degrees of rotation, a shift inside the slack the zoom leaves, and
    independent corner jitter (a mild perspective change). If the quad leaves the photo we zoom in
    a little and shift less: reflected borders would be an artificial cue that UKBench lacks.
    """
    cx, cy, hw, hh = _cover_rect(h, w, aspect)
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if identity:
        return (unit * [hw, hh] + [cx, cy]).astype(np.float32)
    zoom = rng.uniform(1.0, 1.2)
    theta = np.deg2rad(rng.uniform(-6.0, 6.0))
    shift = rng.uniform(-1.0, 1.0, size=2)
    jitter = rng.uniform(-0.05, 0.05, size=(4, 2))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    quad = unit
    for _ in range(12):
        half = np.array([hw, hh]) / zoom
        centre = np.array([cx, cy]) + shift * np.array([hw, hh]) * (1.0 - 1.0 / zoom)
        quad = ((unit + jitter) * half) @ rot.T + centre
        if quad.min() >= 0 and (quad[:, 0] <= w - 1).all() and (quad[:, 1] <= h - 1).all():
            break
        zoom *= 1.04
        shift *= 0.7  # a full shift plus any rotation can never fit; trade shift for zoom
    return quad.astype(np.float32)


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting change (gamma, gain, contrast), colour temperature, then blur/noise/JPEG loss.

    The tone changes are folded into one 256-entry lookup table per channel (fast on 640x480).
    """
    x = np.arange(256, dtype=np.float64) / 255.0
    x = np.power(x, np.exp(rng.uniform(-0.35, 0.35)))
    x = ((x - 0.5) * rng.uniform(0.85, 1.15) + 0.5) * rng.uniform(0.8, 1.2)
    t = rng.uniform(-1.0, 1.0)  # >0 warmer (more red, less blue), <0 cooler
    gains = np.array([1.0 + 0.1 * t, 1.0, 1.0 - 0.1 * t])
    lut = np.clip(x[:, None] * gains[None, :] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = np.stack([lut[img[:, :, c], c] for c in range(3)], axis=2)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.2))
    sigma = rng.uniform(0.0, 4.0)
    noise = rng.standard_normal(out.shape, dtype=np.float32) * sigma
    out = np.clip(out + noise + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # an earlier, lower-quality JPEG generation
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 81))])
        assert ok
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


def make_views(
    image_rgb: np.ndarray,
    n_views: int,
    rng: np.random.Generator,
    size: tuple[int, int] = VIEW_SIZE,
) -> list[np.ndarray]:
    """Make ``n_views`` RGB uint8 views of one object, each ``size = (width, height)``.

    View 0 is the near-original (the central crop of the object, resized); the others differ by
    perspective, crop/scale, rotation, lighting, colour temperature, blur, noise and JPEG loss, so
    they are recognisably the same object without being trivial copies. Deterministic given ``rng``.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {image_rgb.shape} {image_rgb.dtype}")
    out_w, out_h = size
    src = image_rgb
    # Downscale big sources first with INTER_AREA: warpPerspective has no anti-aliasing.
    _, _, hw, _ = _cover_rect(src.shape[0], src.shape[1], out_w / out_h)
    if 2 * hw > 1.5 * out_w:
        f = 1.25 * out_w / (2 * hw)
        src = cv2.resize(src, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    dst = np.array([[0, 0], [out_w - 1, 0], [out_w - 1, out_h - 1], [0, out_h - 1]], np.float32)
    views = []
    for k in range(n_views):
        quad = _view_quad(src.shape[0], src.shape[1], out_w / out_h, rng, identity=k == 0)
        m = cv2.getPerspectiveTransform(quad, dst)
        v = cv2.warpPerspective(
            src, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        views.append(v if k == 0 else _photometric(v, rng))
    return views


_NAME_RE = re.compile(r"^ukbench\d{5}\.jpg$")
_SOURCE_MD = """# Demo dataset (UKBench-style, built offline)

Generated by `ris.demo_data.make_demo_dataset` (format version {version}, seed {seed}); do not edit.
{n_objects} objects x {views} views = {n_images} JPEG files `ukbench00000.jpg` ..., {w}x{h},
quality {quality}. Every {views} consecutive files show one object: object_id = index // {views}
(`groundtruth.tsv`, same form as UKBench's).

Source photos: images bundled inside the scikit-image wheel (`skimage.data`, loaders that need no
download). To get enough objects, the larger photos are cut into several non-overlapping crops, each
used as its own object; a photo that is cropped is never also used whole, so no two objects share
pixels. View 0 of each object is its central 4:3 crop resized; views 1.. add a seeded random
perspective warp, zoom (crop) 1.0-1.2x (more where needed to stay inside the photo), rotation
within +-6 degrees, gamma/gain/contrast, colour-temperature shift, mild noise, and sometimes
Gaussian blur and an earlier low-quality JPEG pass.
These are synthetic views of photos, not photos of real objects from several viewpoints: scores on
this set are only a smoke test, not comparable with UKBench.

| object_id | name | skimage.data loader | crop box (x0, y0, x1, y1) |
|---|---|---|---|
{rows}
"""


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so a killed run never leaves a half-written file in place."""
    from ris.sidecars import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def make_demo_dataset(
    out_dir: str | Path, n_objects: int | None = None, views: int = 4, seed: int = 0
) -> Path:
    """Write the demo dataset into ``out_dir`` and return it; no-op if already complete.

    ``manifest.json`` is written last and removed first when rebuilding, so an interrupted run never
    looks complete. Each object gets its own RNG from ``(seed, object_id)``, so the first k objects
    are identical whatever ``n_objects`` is. Stale ``ukbenchNNNNN.jpg`` files are removed.
    """
    out = Path(out_dir)
    total = len(SOURCES)
    n = total if n_objects is None else int(n_objects)
    if not 1 <= n <= total:
        raise ValueError(f"n_objects must be in 1..{total}, got {n_objects}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    params = {
        "version": FORMAT_VERSION,
        "n_objects": n,
        "views": views,
        "seed": seed,
        "size": list(VIEW_SIZE),
        "jpeg_quality": JPEG_QUALITY,
    }
    files = [f"ukbench{i:05d}.jpg" for i in range(n * views)]
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and all((out / f).is_file() for f in files):
            return out
    except (OSError, ValueError):
        pass

    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    sources = list_source_photos()[:n]
    for obj, (_, img) in enumerate(sources):
        rng = np.random.default_rng([seed, obj])
        for v, view in enumerate(make_views(img, views, rng, VIEW_SIZE)):
            bgr = cv2.cvtColor(view, cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            assert ok
            _write_atomic(out / files[obj * views + v], buf.tobytes())
    keep = set(files)
    for p in out.iterdir():
        if _NAME_RE.match(p.name) and p.name not in keep:
            p.unlink()
    gt = "file\tobject_id\n" + "".join(f"{f}\t{i // views}\n" for i, f in enumerate(files))
    _write_atomic(out / "groundtruth.tsv", gt.encode())
    rows = "\n".join(
        f"| {i} | {name} | {loader} | {box if box else 'whole photo'} |"
        for i, (name, loader, box) in enumerate(SOURCES[:n])
    )
    md = _SOURCE_MD.format(
        version=FORMAT_VERSION, seed=seed, n_objects=n, views=views, n_images=n * views,
        w=VIEW_SIZE[0], h=VIEW_SIZE[1], quality=JPEG_QUALITY, rows=rows,
    )
    _write_atomic(out / "SOURCE.md", md.encode())
    manifest = {"params": params, "objects": [s[0] for s in SOURCES[:n]], "files": files}
    _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    return out


def make_query_view(images_dir: str | Path, out_dir: str | Path, object_id: int = 0) -> Path:
    """Write a fresh view of one object of a dataset made by ``make_demo_dataset``; return its path.

    Why: a demo search should use a query that is *not* in the database. The view comes from the
    same source photo with an RNG stream the dataset never uses, so it differs from all 4 views.
    """
    manifest = json.loads((Path(images_dir) / "manifest.json").read_text())
    params = manifest["params"]
    if not 0 <= object_id < params["n_objects"]:
        raise ValueError(f"object_id must be in 0..{params['n_objects'] - 1}, got {object_id}")
    name, loader, box = SOURCES[object_id]
    rng = np.random.default_rng([params["seed"], object_id, 1_000_003])
    view = make_views(_crop(_load_bundled(loader), box), 2, rng, tuple(params["size"]))[1]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"query_{object_id:03d}_{name}.jpg"
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(view, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    _write_atomic(path, buf.tobytes())
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI: build the demo dataset (default ``data/demo``) and print where it is."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="data/demo")
    ap.add_argument("--n-objects", type=int, default=None)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(make_demo_dataset(a.out_dir, a.n_objects, a.views, a.seed))


if __name__ == "__main__":
    main()
