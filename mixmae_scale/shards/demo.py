"""The built-in demo dataset: real JPEG files in ImageNet layout whose classes are told apart by structure only.

Ten classes of procedurally drawn pictures (a shape, a texture or a gradient per class) written as JPEG under
`train/<wnid>/` and `val/<wnid>/` with a `synset_words.txt`, so that the same converter that reads ImageNet
reads it, and each picture's segmentation mask as a PNG under `masks/<split>/<wnid>/`, which the converter
puts into the sample as `seg.png` (`draw_sample` says what the figure is). Deterministic for a seed.

The foreground and background colours, the image size, aspect ratio, position and scale are drawn the same way
for every class: only the structure (outline, layout, texture) says which class a picture is. A colour family
per class would let a randomly initialised encoder's pooled features (which pass mean colour on faithfully)
read the class from colour alone, and the probes could not tell pretraining from none.
"""

from __future__ import annotations

import colorsys
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from mixmae_scale.atomic_file import replacing

CLASSES = ["circle", "square", "triangle", "hstripes", "vstripes", "checker", "rings", "dots", "cross",
           "gradient"]
# Segmentation masks: class index per pixel, the shards' convention (data/spec.py MASK_IGNORE = 255 for unlabelled
# pixels, which the demo has none of): 0 is the background, 1 + c the figure of class c, so 11 mask classes.
BACKGROUND = 0
MASK_CLASSES = ["background", *CLASSES]
MASKS_DIR = "masks"


def figure_label(cls: int) -> int:
    return 1 + cls


def wnid(index: int) -> str:
    return f"n9{index:07d}"


def _colour(rng: random.Random) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Foreground and background, any hue each, far enough apart that the structure is visible."""
    while True:
        fg, bg = _colour(rng), _colour(rng)
        if sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) > 150:
            return fg, bg


def draw_sample(cls: int, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """The picture and its segmentation mask (mode "L": `figure_label(cls)` on the figure, BACKGROUND elsewhere).

    The mask is drawn with the picture's own shapes and coordinates and draws nothing from `rng`, so a seed
    gives the same JPEGs as before masks existed. What the figure is: the filled shape (circle, square, triangle,
    cross), the disc the rings fill, and the whole frame for the full-frame textures (stripes, checker, dots,
    gradient), whose background-coloured parts belong to the texture as much as its foreground-coloured parts."""
    width, height = rng.randint(96, 256), rng.randint(96, 256)
    fg, background = _colours(rng)
    image = Image.new("RGB", (width, height), background)
    mask = Image.new("L", (width, height), BACKGROUND)
    draw, outline = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    label = figure_label(cls)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    r = min(width, height) * rng.uniform(0.25, 0.45)
    name = CLASSES[cls]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        outline.ellipse([cx - r, cy - r, cx + r, cy + r], fill=label)
    elif name in ("square", "triangle"):
        corners = 4 if name == "square" else 3
        angle = rng.uniform(0, math.pi / 2 if name == "square" else 2 * math.pi)
        turns = [angle + k * 2 * math.pi / corners for k in range(corners)]
        pts = [(cx + r * math.cos(turn), cy + r * math.sin(turn)) for turn in turns]
        draw.polygon(pts, fill=fg)
        outline.polygon(pts, fill=label)
    elif name == "rings":
        step = rng.randint(6, 12)
        for radius in range(int(r * 2), 0, -step):
            colour = fg if (radius // step) % 2 == 0 else background
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        if int(r * 2) > 0:
            outline.ellipse([cx - int(r * 2), cy - int(r * 2), cx + int(r * 2), cy + int(r * 2)], fill=label)
    elif name == "cross":
        w = r * rng.uniform(0.25, 0.4)
        for box in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r]):
            draw.rectangle(box, fill=fg)
            outline.rectangle(box, fill=label)
    else:
        _draw_texture(name, draw, rng, width, height, fg, background)
        mask.paste(label, (0, 0, width, height))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image, mask


def _draw_texture(name: str, draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int,
                  fg: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    if name in ("hstripes", "vstripes"):
        period = rng.randint(8, 20)
        extent = height if name == "hstripes" else width
        for start in range(rng.randint(0, period), extent, period):
            end = start + period // 2
            box = [0, start, width, end] if name == "hstripes" else [start, 0, end, height]
            draw.rectangle(box, fill=fg)
    elif name == "checker":
        cell = rng.randint(10, 24)
        for y in range(0, height, cell):
            for x in range(0, width, cell):
                if (x // cell + y // cell) % 2 == 0:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    elif name == "dots":
        gap = rng.randint(14, 26)
        dot = gap // 4
        for y in range(gap // 2, height, gap):
            for x in range(gap // 2, width, gap):
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)
    elif name == "gradient":
        for x in range(width):
            t = x / max(width - 1, 1)
            colour = tuple(int(background[k] * (1 - t) + fg[k] * t) for k in range(3))
            draw.line([(x, 0), (x, height)], fill=colour)


def draw_image(cls: int, rng: random.Random) -> Image.Image:
    return draw_sample(cls, rng)[0]


def mask_path(root: Path, image: Path) -> Path:
    """Where the demo tree keeps an image's mask: `masks/` mirrors the tree, `<split>/<wnid>/<stem>.png`."""
    return root / MASKS_DIR / image.relative_to(root).with_suffix(".png")


def build_demo_images(root: Path, train_per_class: int = 260, val_per_class: int = 150, seed: int = 0,
                      workers: int = 1) -> dict:
    """Writes the demo tree under `root`; skips files that already exist (reruns are cheap). Each (split, class)
    draws from its own seeded stream, so `workers` processes draw the same files as one.

    150 validation images per class: the random encoders' probe top-1s differ by the binomial noise of the
    validation split as well as by their weights, and 1500 images keep that noise near 1 point."""
    from mixmae_scale.shards.builder import bounded_pool

    root.mkdir(parents=True, exist_ok=True)
    words = "".join(f"{wnid(i)} demo {name}\n" for i, name in enumerate(CLASSES))
    (root / "synset_words.txt").write_text(words)
    (root / MASKS_DIR).mkdir(exist_ok=True)
    (root / MASKS_DIR / "classes.json").write_text(json.dumps(MASK_CLASSES))
    units = [(split, per_class, cls) for split, per_class in (("train", train_per_class), ("val", val_per_class))
             for cls in range(len(CLASSES))]
    for _ in bounded_pool(_draw_class, units, workers, (root, seed)):
        pass
    return {"train": train_per_class * len(CLASSES), "val": val_per_class * len(CLASSES)}


def _draw_class(unit: tuple[str, int, int], root: Path, seed: int) -> None:
    """One class of one split: its JPEGs and masks (those missing)."""
    split, per_class, cls = unit
    folder = root / split / wnid(cls)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{split}-{cls}")
    masks = root / MASKS_DIR / split / wnid(cls)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        image, mask = draw_sample(cls, rng)  # drawn even when the files exist, to keep the RNG stream
        quality = rng.randint(80, 95)
        path = folder / f"{wnid(cls)}_{i:05d}.JPEG"
        if not path.exists():
            with replacing(path) as tmp:
                image.save(tmp, format="JPEG", quality=quality)
        if not mask_path(root, path).exists():  # a tree made before masks existed gains them
            with replacing(mask_path(root, path)) as tmp:
                mask.save(tmp, format="PNG")
