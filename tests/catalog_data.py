"""A colour catalog for tests and benchmarks: Fashion-MNIST-like garments tinted with one
of a few colours, priced as the class mean plus the colour's premium (plus a little
noise), written as PNG and JPEG files with a prices CSV."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.data.prices import DEFAULT_MEANS
from tasks.reports import GARMENTS
from tests import conftest

# colour -> (RGB of a full-intensity pixel, price premium)
COLOURS = {
    "red": ((255, 40, 40), 60.0),
    "green": ((40, 220, 40), 0.0),
    "blue": ((50, 80, 255), 120.0),
}
NOISE = 2.0


def garments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated 28x28 gray garments (class-dependent bright squares on a dark field)."""
    return conftest.garments(n, np.random.default_rng(seed))


def tint(gray: np.ndarray, colour: str) -> np.ndarray:
    rgb = np.asarray(COLOURS[colour][0], dtype=np.float64)
    return np.clip(gray[..., None].astype(np.float64) / 255.0 * rgb + 0.5, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def tinted(images: np.ndarray, labels: np.ndarray, seed: int, gray: bool = False):
    """Yield (key, image bytes, price, category) per garment: a seeded colour, every
    fifth image a JPEG, keys in folders by colour; ``gray`` drops the colour (the same
    catalog as a colour-blind model sees it)."""
    rng = np.random.default_rng(seed + 1)
    names = list(COLOURS)
    for i, (img, c) in enumerate(zip(images, labels, strict=True)):
        colour = names[int(rng.integers(len(names)))]
        rgb = tint(img, colour)
        if gray:
            rgb = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, -1)
        fmt, ext = ("JPEG", "jpg") if i % 5 == 4 else ("PNG", "png")
        price = DEFAULT_MEANS[int(c)] + COLOURS[colour][1] + float(rng.normal(0, NOISE))
        yield f"{colour}/{i:05d}.{ext}", encode(rgb, fmt), round(price, 2), GARMENTS[int(c)]


def write_catalog(directory: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0,
                  gray: bool = False) -> list[dict]:  # fmt: skip
    """The files under ``directory``; returns the good price rows."""
    rows = []
    for key, body, price, category in tinted(images, labels, seed, gray):
        path = directory / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        rows.append({"image": key, "price": f"{price:.2f}", "category": category})
    return rows


def csv_text(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n"
