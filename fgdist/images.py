"""Images in: the one place where encoded bytes become a PIL image (`open_image`), where any PIL
mode becomes upright 8-bit RGB (`to_rgb`), and where an image too small or too elongated to mean
anything is refused (`check_shape`).

Every decoder calls `open_image` (training and evaluation streams, `fgdist.retrieval.embed.decode`, the
pictures, the shard builder and `shards verify`); every transform, training and evaluation alike,
calls `to_rgb` first (fgdist/data/loader.py `make_transform`), so a PIL image handed to
`ImageEmbedder.preprocess` is read exactly as a file is. `open_image` keeps the image's own mode:
the strong augmentation treats single-channel images differently, and reads that from the mode.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from fgdist.search_errors import ImageTooSmallError

# Where a transparent pixel shows, what is behind it: white, the background of most product and
# catalogue pictures. An opaque RGBA copy of an RGB image is the image itself.
BACKGROUND = (255, 255, 255)
# The full scales that samples of integer and float grayscale modes are read against: the first
# that holds an image's largest sample. PNG and TIFF store 16-bit samples as 0..65535 (Pillow
# opens them as I;16; older Pillows and some TIFFs as I, which is also what `convert("I")` of an
# 8-bit image gives, 0..255); float images are 0..1 by convention, or 0..255 as Pillow reads them.
SIXTEEN = (65535.0,)
FULL_SCALES = {
    "I;16": SIXTEEN,
    "I;16B": SIXTEEN,
    "I;16L": SIXTEEN,
    "I;16N": SIXTEEN,
    "I": (255.0, 65535.0),
    "F": (1.0, 255.0),
}
# The refusal thresholds (check_shape). Below 8 px on the shorter side an image holds fewer pixels
# than the smallest crop any config trains on (data.image_size >= 8): a few blurred colours, whose
# neighbours mean nothing. Beyond 20:1 the centre crop keeps at most 1/20 of the image: the query
# would be a sliver of it. Photos are 4:3 to 16:9 and phone panoramas up to about 10:1, all accepted.
MIN_SIDE = 8
MAX_ASPECT = 20.0


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes, fully decoded (every pixel: a truncated file fails here, not later) in
    the image's own mode. Raises what Pillow raises (fgdist.data.shardset.DECODE_ERRORS)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied, as phone photos need) 8-bit RGB, from any mode:
    transparency is composited onto BACKGROUND; 16-bit and integer grayscale is scaled down to
    8 bits, not clipped, and float grayscale scaled up from 0..1 (FULL_SCALES); CMYK, 1-bit,
    palette and the rest through Pillow's conversion. An RGB image without an orientation tag
    comes back unchanged, pixel for pixel."""
    image = ImageOps.exif_transpose(image)
    if image.mode in FULL_SCALES:
        image = _grayscale_8bit(image)
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _grayscale_8bit(image: Image.Image) -> Image.Image:
    """An integer or float grayscale image as 8-bit L: its samples scaled from the first of its
    mode's FULL_SCALES that holds its largest sample (negative samples read as 0)."""
    pixels = np.asarray(image, dtype=np.float64)
    top = float(pixels.max())
    scales = FULL_SCALES[image.mode]
    full = next((s for s in scales if top <= s), scales[-1])
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / full)), 0, 255).astype(np.uint8), "L")


def check_shape(size: tuple[int, int], where: str) -> None:
    """ImageTooSmallError, naming `where`, for an image whose shorter side is under MIN_SIDE
    pixels or whose sides differ by more than MAX_ASPECT times."""
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        raise ImageTooSmallError(
            f"{where}: a {width}x{height} image; the shorter side must be at least {MIN_SIDE} px to mean anything"
        )
    if long > MAX_ASPECT * short:
        raise ImageTooSmallError(
            f"{where}: a {width}x{height} image ({long / short:.0f}:1); images more elongated than "
            f"{MAX_ASPECT:.0f}:1 would be judged on a sliver of themselves"
        )
