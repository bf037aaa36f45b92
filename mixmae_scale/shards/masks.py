"""Segmentation masks beside a source's images, and the `seg.png` member they become in a shard.

A mask in a shard is an 8-bit single-channel PNG of the image's size whose value is the pixel's class index
(0 .. classes - 1) or MASK_IGNORE (255) for a pixel without a label; the loaders (data/spec.py) and the metrics
(finetune/segmentation_metrics.py) read that convention and no other. Sources keep their own:
- the demo tree (shards/demo.py): `masks/<split>/<wnid>/<stem>.png` beside `train/`, `val/`, values as above,
  class names in `masks/classes.json`;
- ADE20K (`images/{training,validation}/*.jpg`, `annotations/{training,validation}/*.png`): 0 is "other",
  which its benchmark ignores, and 1..150 the classes, so conversion maps 0 -> 255 and l -> l - 1
  (mmseg's `reduce_zero_label`).
A mask that is missing, does not decode, has several channels, another size than its image, or a value above
the classes rejects its sample with the reason, as a bad image does. When conversion resizes an image (a
shorter side, an oversize downscale), its mask is resized with nearest-neighbour sampling: no invented labels.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mixmae_scale.shards.sources import SourceError

MASK_MEMBER = "seg.png"  # the sample's member extension: webdataset key "<key>.seg.png"
MASK_IGNORE = 255
DEMO_MASKS = "masks"
ADE20K_CLASSES = 150
ADE20K_SPLITS = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class MaskLayout:
    """Where each image's mask is (the image's path relative to `root`, `image_prefix` swapped for `mask_prefix`,
    suffix .png) and how its values map to the shards' convention."""

    root: str
    image_prefix: str
    mask_prefix: str
    class_names: tuple[str, ...]
    reduce_zero: bool = False  # ADE20K: 0 ("other") -> 255, l -> l - 1

    def path(self, rel: str) -> Path:
        if not rel.startswith(self.image_prefix):
            raise SourceError(f"{rel}: not under {self.image_prefix!r}, so it has no mask in this layout")
        return Path(self.root) / self.mask_prefix / Path(rel[len(self.image_prefix):]).with_suffix(".png")


def demo_layout(src: Path) -> MaskLayout | None:
    """The demo tree's masks (`masks/` beside the splits), or None when the tree has none."""
    folder = src / DEMO_MASKS
    if not folder.is_dir():
        return None
    listing = folder / "classes.json"
    if not listing.is_file():
        raise SourceError(f"{folder}: a masks folder without classes.json (the mask classes' names, in index order); "
                          "write it, or move the masks folder away to convert without masks")
    names = json.loads(listing.read_text())
    if not isinstance(names, list) or not 0 < len(names) < MASK_IGNORE:
        raise SourceError(f"{listing}: expected a list of 1 to {MASK_IGNORE - 1} class names")
    return MaskLayout(str(src), "", f"{DEMO_MASKS}/", tuple(str(n) for n in names))


def ade20k_layout(src: Path) -> MaskLayout:
    return MaskLayout(str(src), "images/", "annotations/", tuple(f"class{i}" for i in range(ADE20K_CLASSES)),
                      reduce_zero=True)


def _labels(array: np.ndarray, layout: MaskLayout) -> np.ndarray:
    if layout.reduce_zero:
        array = np.where(array == 0, MASK_IGNORE, np.where(array == MASK_IGNORE, MASK_IGNORE, array - 1))
    return array.astype(np.uint8)


def prepare_mask(path: Path, layout: MaskLayout, source_size: tuple[int, int], size: tuple[int, int]
                 ) -> tuple[bytes | None, str]:
    """(PNG bytes of the mask at `size`, '') or (None, why the sample is rejected). `source_size` is the source
    image's (width, height), which the mask must have."""
    try:
        with Image.open(path) as opened:
            opened.load()
            mask = opened
    except FileNotFoundError:
        return None, f"no mask: expected {path}"
    except Exception as exc:  # noqa: BLE001 - whatever one mask does, the sample is rejected with the reason
        return None, f"mask {path} does not decode: {type(exc).__name__}: {exc}"
    if mask.mode not in ("L", "P", "I", "I;16"):
        return None, f"mask {path} is {mask.mode}, not one channel of class indices"
    if mask.size != source_size:
        return None, (f"mask {path} is {mask.size[0]}x{mask.size[1]}, its image {source_size[0]}x{source_size[1]}")
    array = np.asarray(mask).astype(np.int64)
    if int(array.max(initial=0)) > MASK_IGNORE or int(array.min(initial=0)) < 0:
        return None, f"mask {path} has value {int(array.max())}: class indices are 0..{MASK_IGNORE}"
    labels = _labels(array, layout)
    beyond = labels[(labels != MASK_IGNORE) & (labels >= len(layout.class_names))]
    if beyond.size:
        value = int(beyond.max()) + (1 if layout.reduce_zero else 0)
        return None, (f"mask {path} has value {value}, beyond its {len(layout.class_names)} classes"
                      + (" (1..N; 0 is ignored)" if layout.reduce_zero else f" (0..{len(layout.class_names) - 1}, "
                         f"{MASK_IGNORE} = ignore)"))
    image = Image.fromarray(labels, mode="L")
    if image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), ""
