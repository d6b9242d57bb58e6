"""Training-image transforms beyond the paper's recipes: `data.augment: strong` and several views
of one image (`data.views`).

Every random choice is drawn from the `random.Random` the data stream passes in, which is seeded
per (seed, epoch, rank, worker, sample position) (fgdist/data/loader.py), so a resumed run replays
exactly the pixels of an uninterrupted one. PIL only: no torchvision transform draws from a
global generator behind our back.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance

# Colour images (SimCLR's CIFAR settings): jitter of brightness, contrast, saturation and hue,
# applied with probability JITTER_P in a random order; grayscale with probability GRAYSCALE_P.
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
JITTER_P = 0.8
GRAYSCALE_P = 0.2
# Single-channel images (Fashion-MNIST): colour means nothing there and flips change the class of
# some items (shoes point one way), so a small rotation + shift and random erasing instead
# (torchvision RandomErasing's defaults).
AFFINE_DEGREES = 10.0
AFFINE_SHIFT = 0.1  # of the image side
ERASE_P = 0.5
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
# PIL modes of single-channel images (before the pipeline converts everything to RGB).
SINGLE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "P"}


def random_resized_crop(img: Image.Image, rng: random.Random, size: int, scale: tuple[float, float]) -> Image.Image:
    """A crop covering `scale` of the area with aspect ratio in [3/4, 4/3], resized to size x size
    (torchvision's RandomResizedCrop: 10 tries, then the central square)."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        cw = ch = min(w, h)
        x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))


def _shift_hue(img: Image.Image, fraction: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(fraction * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def colour_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    ops = list(JITTER)
    rng.shuffle(ops)
    for op in ops:
        s = JITTER[op]
        if op == "hue":
            img = _shift_hue(img, rng.uniform(-s, s))
        else:
            enhance = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast}.get(
                op, ImageEnhance.Color
            )
            img = enhance(img).enhance(rng.uniform(1 - s, 1 + s))
    return img


def small_affine(img: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES)
    shift = [round(rng.uniform(-AFFINE_SHIFT, AFFINE_SHIFT) * side) for side in img.size]
    return img.rotate(angle, resample=Image.BILINEAR, translate=tuple(shift))


def random_erase(img: Image.Image, rng: random.Random, fill: tuple[int, int, int]) -> Image.Image:
    """With probability ERASE_P, one rectangle filled with `fill` (the normalization mean, i.e.
    zero after normalization, as RandomErasing's value=0)."""
    if rng.random() >= ERASE_P:
        return img
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*ERASE_AREA)
        ratio = math.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
        ew, eh = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < ew < w and 0 < eh < h:
            x, y = rng.randint(0, w - ew), rng.randint(0, h - eh)
            img = img.copy()
            img.paste(fill, (x, y, x + ew, y + eh))
            return img
    return img


def strong_augment(
    img: Image.Image,
    rng: random.Random,
    size: int,
    scale: tuple[float, float],
    single_channel: bool,
    fill: tuple[int, int, int],
    colour: bool = True,
) -> Image.Image:
    """`data.augment: strong` on an RGB-converted image; `single_channel` says what it was.
    colour=False (`data.colour: false`) leaves colours alone: no jitter, no grayscale, for data
    whose labels are colours (the synthetic patches)."""
    img = random_resized_crop(img, rng, size, scale)
    if single_channel:
        return random_erase(small_affine(img, rng), rng, fill)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if not colour:
        return img
    if rng.random() < JITTER_P:
        img = colour_jitter(img, rng)
    if rng.random() < GRAYSCALE_P:
        img = img.convert("L").convert("RGB")
    return img


def with_views(transform, views: int):
    """`views` independent augmentations of one decoded image, stacked [views, C, H, W]. Each view
    draws from its own generator seeded from the sample's, so views differ and replay exactly.
    One view is the transform itself (the sample's generator, as without this option)."""
    if views == 1:
        return transform

    def many(img: Image.Image, rng: random.Random) -> torch.Tensor:
        seeds = [rng.getrandbits(63) for _ in range(views)]
        return torch.stack([transform(img, random.Random(s)) for s in seeds])

    return many
