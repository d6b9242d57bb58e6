"""One evaluation preprocessing (fgdist/images.py, fgdist/data/loader.py make_transform) on real images:
the 20 CIFAR-100 test images of shared/fixtures/cifar100_test20 as a catalogue, embedded by
random-init ResNets through export, load_model and fgdist.retrieval.embed.decode, the path of embed and
search. A larger copy and an RGBA copy find their original; every PIL mode embeds; data at its
native size is preprocessed bit for bit as before the resize existed; too small or too elongated
images are refused by name."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdist.config import ModelConfig, load_config
from fgdist.data.loader import MEAN, STD, _crop_flip, make_transform
from fgdist.images import MAX_ASPECT, MIN_SIDE, open_image, to_rgb
from fgdist.retrieval.embed import decode
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import ImageEmbedder, eval_transform, export_model, load_model
from fgdist.search_errors import ImageTooSmallError
from fgdist.training.model import build_backbone
from shards.sources.fashion_mnist import DEFAULT_ROOT as FMNIST_ROOT
from shards.sources.fashion_mnist import open_fashion_mnist
from shards.sources.synthetic import open_synthetic
from tests.helpers import REPO, shared_fixture

CIFAR = shared_fixture("cifar100_test20")
needs_cifar = pytest.mark.skipif(CIFAR is None, reason="shared/fixtures/cifar100_test20 is not beside this checkout")
# The two evaluation recipes: the paper's CIFAR one (no resize before this change) and ImageNet's.
RECIPES = {
    "crop_flip": ({"augment": "crop_flip", "image_size": 32, "resize": 256, "padding": 4}, "cifar"),
    "resized_crop_flip": ({"augment": "resized_crop_flip", "image_size": 224, "resize": 256, "padding": 4}, "imagenet"),
}


def normalized(img: Image.Image) -> torch.Tensor:
    array = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def old_eval(img: Image.Image, size: int) -> torch.Tensor:
    """The crop_flip evaluation transform before the resize: Pillow's RGB, the central crop."""
    img = img.convert("RGB")
    x, y = (img.width - size) // 2, (img.height - size) // 2
    return normalized(img.crop((x, y, x + size, y + size)))


def catalogue_files() -> list[Path]:
    return sorted(CIFAR.glob("test_*.png"))


@pytest.fixture(scope="module", params=sorted(RECIPES))
def embedder(request, tmp_path_factory) -> ImageEmbedder:
    """A random-init narrow ResNet-18 of the recipe, exported and loaded back as search loads it."""
    preprocessing, stem = RECIPES[request.param]
    torch.manual_seed(0)
    cfg = ModelConfig(width=16, stem=stem)
    built = ImageEmbedder(build_backbone(cfg), cfg.model_dump(), preprocessing).eval()
    return load_model(export_model(built, tmp_path_factory.mktemp("export") / "model"))


@pytest.fixture(scope="module")
def catalogue(embedder) -> torch.Tensor:
    """The embedder's vectors of the 20 catalogue images, in file order."""
    return embed_files(embedder, catalogue_files())


def embed_files(embedder: ImageEmbedder, paths: list[Path]) -> torch.Tensor:
    transform = eval_transform(embedder.preprocessing)
    with torch.no_grad():
        return embedder(torch.stack([decode(p, transform) for p in paths]))


def top1(queries: torch.Tensor, catalogue: torch.Tensor) -> list[int]:
    return (queries @ catalogue.T).argmax(dim=1).tolist()


# -- native size: evaluation numbers do not move ---------------------------------------------------
def cifar_bytes() -> list[bytes]:
    return [p.read_bytes() for p in catalogue_files()]


def fmnist_bytes() -> list[bytes]:
    if not Path(FMNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return [r.load() for r in open_fashion_mnist(limit_per_split=20).splits["test"]]


def synthetic_bytes() -> list[bytes]:
    return [r.load() for r in open_synthetic(num_super=4, fine_per_super=2, test_per_fine=2).splits["test"]]


NATIVE = [
    ("cifar100.json", cifar_bytes),
    ("fmnist_cpu.json", fmnist_bytes),
    ("synthetic_cpu.json", synthetic_bytes),
]


@pytest.mark.parametrize("config,images", NATIVE, ids=[c for c, _ in NATIVE])
def test_data_at_its_native_size_is_preprocessed_bit_for_bit_as_before(config, images):
    """The configs' own data (the bytes their shards hold) gives the same evaluation tensors as the
    transform without a resize did, and the same crop_flip training crops for the same generator:
    evaluation numbers and resumed runs do not move."""
    if config == "cifar100.json" and CIFAR is None:
        pytest.skip("shared/fixtures/cifar100_test20 is not beside this checkout")
    data = load_config(REPO / "configs" / config).data
    assert data.augment == "crop_flip"
    evaluate, train = make_transform(data, train=False), make_transform(data, train=True)
    for i, encoded in enumerate(images()):
        img = open_image(encoded)
        assert img.size == (data.image_size, data.image_size)  # native: the case this test is about
        assert torch.equal(evaluate(img, None), old_eval(img, data.image_size))
        old_crop = _crop_flip(img.convert("RGB"), random.Random(i), data.image_size, data.padding)
        assert torch.equal(train(img, random.Random(i)), normalized(old_crop))


# -- copies find their original --------------------------------------------------------------------
@needs_cifar
def test_a_256_px_copy_finds_its_original(embedder, catalogue, tmp_path):
    """A bicubic 256-px copy of each catalogue image finds it at rank 1. For crop_flip, the
    central 32x32 patch (the evaluation before the resize) does not, for most: the check can fail."""
    files = catalogue_files()
    copies = []
    for path in files:
        copies.append(tmp_path / path.name)
        Image.open(path).resize((256, 256), Image.Resampling.BICUBIC).save(copies[-1])
    assert top1(embed_files(embedder, copies), catalogue) == list(range(len(files)))
    if embedder.preprocessing["augment"] == "crop_flip":
        with torch.no_grad():
            patches = embedder(torch.stack([old_eval(open_image(p.read_bytes()), 32) for p in copies]))
        hits = sum(found == i for i, found in enumerate(top1(patches, catalogue)))
        assert hits < len(files) // 2


@needs_cifar
def test_an_rgba_copy_embeds_as_its_original(embedder, catalogue, tmp_path):
    files = catalogue_files()
    copies = []
    for path in files:
        copies.append(tmp_path / path.name)
        Image.open(path).convert("RGBA").save(copies[-1])
    assert open_image(copies[0].read_bytes()).mode == "RGBA"
    queries = embed_files(embedder, copies)
    assert torch.equal(queries, catalogue)
    assert top1(queries, catalogue) == list(range(len(files)))


def test_transparent_pixels_show_the_white_background():
    """Alpha compositing onto white, checked against the formula; the stored colour of a fully
    transparent pixel (often black) does not show, as it did through Pillow's convert('RGB')."""
    gen = np.random.default_rng(0)
    rgb = gen.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    alpha = gen.integers(0, 256, (12, 10), dtype=np.uint8)
    alpha[:3] = 0
    rgb[:3] = 0
    out = np.asarray(to_rgb(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), dtype=np.int64)
    a = alpha[..., None] / 255.0
    want = a * rgb + (1 - a) * 255
    assert np.abs(out - want).max() <= 1
    assert (out[:3] == 255).all()
    grey = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    assert (np.asarray(to_rgb(grey))[:3] == 255).all()


# -- every mode ----------------------------------------------------------------------------------
def mode_copies(rgb: Image.Image, folder: Path) -> dict[str, tuple[Path, Image.Image | None]]:
    """Copies of `rgb` in other modes and formats: file, and the image it must read as exactly
    (None: only finite)."""
    grey = rgb.convert("L")
    levels = np.asarray(grey)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display (a phone held upright)
    made = {
        "grayscale.png": (grey, rgb.convert("L").convert("RGB")),
        "grayscale.jpg": (grey, None),
        "la.png": (grey.convert("LA"), grey.convert("RGB")),
        "palette_transparency.png": (palette, None),
        "bilevel.png": (rgb.convert("1"), rgb.convert("1").convert("RGB")),
        "cmyk.jpg": (rgb.convert("CMYK"), None),
        "cmyk.tif": (rgb.convert("CMYK"), rgb),
        "sixteen_bit.png": (Image.fromarray(levels.astype(np.uint16) * 257), grey.convert("RGB")),
        "sixteen_bit.tif": (Image.fromarray(levels.astype(np.uint16) * 257), grey.convert("RGB")),
        "int32.tif": (grey.convert("I"), grey.convert("RGB")),
        "float.tif": (Image.fromarray(levels.astype(np.float32) / 255.0), grey.convert("RGB")),
        "exif_rotated.png": (rgb.transpose(Image.Transpose.ROTATE_90), rgb),
    }
    files = {}
    for name, (image, expected) in made.items():
        path = folder / name
        image.save(path, **({"exif": exif.tobytes()} if name.startswith("exif") else {}))
        files[name] = (path, expected)
    return files


@needs_cifar
def test_every_mode_embeds_and_reads_as_its_rgb_meaning(embedder, tmp_path):
    """Grayscale, LA, palette with transparency, 1-bit, CMYK, 16-bit PNG and TIFF, 32-bit integer
    and float TIFF, an EXIF-rotated photo: each embeds to a finite unit vector, and where the copy
    is lossless it reads as exactly the image it stands for (16-bit scaled down, not clipped white)."""
    rgb = Image.open(catalogue_files()[3]).convert("RGB")
    transform = eval_transform(embedder.preprocessing)
    copies = mode_copies(rgb, tmp_path)
    modes = {open_image(path.read_bytes()).mode for path, _ in copies.values()}
    assert {"L", "LA", "P", "1", "CMYK", "I;16", "I", "F"} <= modes
    for name, (path, expected) in copies.items():
        if expected is not None:
            assert torch.equal(decode(path, transform), transform(expected, None)), name
    vectors = embed_files(embedder, [path for path, _ in copies.values()])
    assert torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(copies)))


# -- too small or too elongated -----------------------------------------------------------------
REFUSED = [((1, 1), "shorter side"), ((5000, 3), "shorter side"), ((2100, 100), "21:1")]


@pytest.mark.parametrize("size,why", REFUSED, ids=["1x1", "5000x3", "21to1"])
def test_too_small_or_too_elongated_images_are_refused_by_name(tmp_path, size, why):
    path = tmp_path / "tiny.png"
    Image.new("RGB", size, (90, 120, 30)).save(path)
    cfg = ModelConfig(width=4)
    embedder = ImageEmbedder(build_backbone(cfg), cfg.model_dump(), RECIPES["crop_flip"][0])
    with pytest.raises(ImageTooSmallError, match=rf"{path}: a {size[0]}x{size[1]} image.*{why}"):
        decode(path, eval_transform(embedder.preprocessing))
    with pytest.raises(ImageTooSmallError, match=rf"image 1 of 2: a {size[0]}x{size[1]} image"):
        embedder.preprocess([Image.new("RGB", (32, 32)), Image.open(path)])


def test_the_thresholds_themselves_are_accepted(tmp_path):
    cfg = ModelConfig(width=4)
    embedder = ImageEmbedder(build_backbone(cfg), cfg.model_dump(), RECIPES["crop_flip"][0]).eval()
    edge = [(MIN_SIDE, MIN_SIDE), (int(MAX_ASPECT * MIN_SIDE), MIN_SIDE), (MIN_SIDE, int(MAX_ASPECT * MIN_SIDE))]
    images = embedder.preprocess([Image.new("RGB", size, (200, 10, 10)) for size in edge])
    assert images.shape == (3, 3, 32, 32)


def test_embed_refuses_a_folder_with_a_1x1_image_and_writes_nothing(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(photos / "a.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(photos / "pixel.gif")
    cfg = ModelConfig(width=4)
    model = export_model(
        ImageEmbedder(build_backbone(cfg), cfg.model_dump(), RECIPES["crop_flip"][0]), tmp_path / "model"
    )
    out = tmp_path / "emb"
    assert embed_main(["--model", str(model), "--images", str(photos), "--out", str(out), "--quiet"]) == 2
    assert f"ImageTooSmallError: {photos / 'pixel.gif'}: a 1x1 image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "photos"]
