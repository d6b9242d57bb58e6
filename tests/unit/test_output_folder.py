"""Nothing of the user's is ever deleted (fgdist/output_folder.py): --overwrite replaces only a
folder fgdist wrote, never an input, never anything else; outputs get the usual modes."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdist.config import RunConfig
from fgdist.output_folder import MARKER, atomic_file, atomic_folder, begin, check_free, partial_path
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import embedder_from, export_model
from fgdist.retrieval.export import main as export_main
from fgdist.retrieval.search import index_main
from fgdist.search_errors import NotFgdistOutputError, OutputExistsError, OutputIsInputError
from fgdist.training.model import EmbeddingNet
from shards.cli import main as shards_main
from tests.helpers import REPO

pytest.importorskip("faiss")

SYNTHETIC = [
    a for opt in ("num_super=2", "fine_per_super=1", "train_per_fine=2", "test_per_fine=1") for a in ("--opt", opt)
]


@pytest.fixture(autouse=True)
def umask_022():
    """Every test under the usual umask, and the caller's put back after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@dataclass
class World:
    """A user's photos and fgdist's outputs made from them."""

    photos: Path  # <super>/<fine>/*.png, as the folder source reads it
    model: Path  # an export folder
    embeddings: Path
    index: Path
    shards: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The photos and outputs, made once (under umask 022) and copied for each test."""
    old = os.umask(0o022)
    root = tmp_path_factory.mktemp("world")
    photos = root / "photos"
    gen = np.random.default_rng(0)
    for i in range(6):
        folder = photos / f"s{i % 2}" / f"f{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    cfg = RunConfig.model_validate({"model": {"width": 4}, "data": {"image_size": 16, "shards": str(root)}})
    torch.manual_seed(0)
    net = EmbeddingNet(cfg.model, 4, None).eval()
    export_model(embedder_from(net, cfg.model, cfg.data, "backbone"), root / "model")
    assert (
        embed_main(["--model", str(root / "model"), "--images", str(photos), "--out", str(root / "emb"), "--quiet"])
        == 0
    )
    assert index_main(["--embeddings", str(root / "emb"), "--out", str(root / "index")]) == 0
    assert shards_main(["build", "--source", "synthetic", "--out", str(root / "shards"), "--quiet", *SYNTHETIC]) == 0
    os.umask(old)
    return root


@pytest.fixture
def world(built, tmp_path) -> World:
    for name in ("photos", "model", "emb", "index", "shards"):
        shutil.copytree(built / name, tmp_path / name)
    return World(*(tmp_path / name for name in ("photos", "model", "emb", "index", "shards")))


# command -> (module, main function, its arguments writing `out`)
COMMANDS = {
    "embed": (
        "fgdist.retrieval.embed",
        "main",
        lambda w, out: ["--model", w.model, "--images", w.photos, "--out", out, "--quiet"],
    ),
    "index": ("fgdist.retrieval.search", "index_main", lambda w, out: ["--embeddings", w.embeddings, "--out", out]),
    "export": ("fgdist.retrieval.export", "main", lambda w, out: ["--model", w.model, "--out", out]),
    "shards": (
        "shards.cli",
        "main",
        lambda w, out: (
            ["build", "--source", "folder", "--path", w.photos, "--out", out, "--quiet"]
            + ["--opt", "test_fraction=0.5"]
        ),
    ),
}
# command -> (the flag of the input aimed at, the World field that flag is given)
INPUTS = {"embed": ("--images", "photos"), "index": ("--embeddings", "embeddings"), "export": ("--model", "model")}
INPUTS["shards"] = ("--path", "photos")


def cli(command: str, world: World, out, *extra) -> subprocess.CompletedProcess:
    """The command's real entry point in a fresh process."""
    module, function, arguments = COMMANDS[command]
    argv = [str(a) for a in arguments(world, out)] + list(extra)
    code = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def in_process(command: str, world: World, out, *extra) -> int:
    module, function, arguments = COMMANDS[command]
    main = {
        "fgdist.retrieval.embed": embed_main,
        "fgdist.retrieval.search": index_main,
        "fgdist.retrieval.export": export_main,
    }.get(module)
    return (main or shards_main)([str(a) for a in arguments(world, out)] + list(extra))


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "holiday.png").write_bytes(b"\x89PNG not really")
    return path


def test_the_reported_command_refuses_and_leaves_the_images(world):
    """The reported bug, in a real process: `fgdist-embed --images victim --out victim --overwrite`
    deleted the images."""
    before = contents(world.photos)
    result = cli("embed", world, world.photos, "--overwrite")
    assert result.returncode == 2, result.stderr
    assert f"OutputIsInputError: the output {world.photos} is the input --images {world.photos}" in result.stderr
    assert contents(world.photos) == before and not partial_path(world.photos).exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_overwrite_aimed_at_the_input_refuses_and_leaves_it(world, capsys, command):
    flag, field = INPUTS[command]
    victim = getattr(world, field)
    before = contents(victim)
    assert in_process(command, world, victim, "--overwrite") == 2
    assert f"the output {victim} is the input {flag} {victim}" in capsys.readouterr().err
    assert contents(victim) == before and not partial_path(victim).exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_overwrite_aimed_at_a_folder_fgdist_did_not_write_refuses_and_leaves_it(world, tmp_path, capsys, command):
    theirs = users_folder(tmp_path / "theirs")
    before = contents(theirs)
    assert in_process(command, world, theirs, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "was not written by fgdist" in err and "remove or move it by hand" in err
    assert contents(theirs) == before and not partial_path(theirs).exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_fgdist_wrote_is_replaced_with_overwrite_only(world, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert in_process(command, world, out) == 0
    first = json.loads((out / MARKER).read_text())
    assert first["files"] == sorted(k for k in contents(out) if k != MARKER)
    assert in_process(command, world, out) == 2  # no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    (out / MARKER).write_text(json.dumps({**first, "time": "replace me"}))
    assert in_process(command, world, out, "--overwrite") == 0
    assert json.loads((out / MARKER).read_text())["time"] != "replace me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial or old copy


def test_a_file_added_to_an_output_keeps_it_from_being_replaced(world):
    (world.index / "my notes.txt").write_text("mine")
    before = contents(world.index)
    with pytest.raises(NotFgdistOutputError, match="holds files fgdist did not write \\(my notes.txt\\)"):
        check_free(world.index, overwrite=True)
    with pytest.raises(NotFgdistOutputError):
        with atomic_folder(world.index, overwrite=True) as partial:
            (partial / "index.faiss").write_text("new")
    assert contents(world.index) == before


def test_outputs_older_than_the_marker_are_recognised_by_their_metadata(world, tmp_path):
    """An output written before the marker existed is fgdist's when its own metadata file is in
    fgdist's format; the same file name with anything else in it is not."""
    for out in (world.model, world.embeddings, world.index, world.shards):
        (out / MARKER).unlink()
        check_free(out, overwrite=True)
    lookalike = users_folder(tmp_path / "lookalike")
    (lookalike / "_embeddings.json").write_text(json.dumps({"format": "someone-else/1"}))
    with pytest.raises(NotFgdistOutputError, match="no .fgdist-output.json"):
        check_free(lookalike, overwrite=True)


def test_an_output_inside_or_around_an_input_is_refused_through_links(world, tmp_path):
    inside = world.photos / "s0" / "emb"
    with pytest.raises(OutputIsInputError, match=f"{inside} lies inside the input --images {world.photos}"):
        check_free(inside, overwrite=True, inputs={"--images": world.photos})
    with pytest.raises(OutputIsInputError, match="contains the input --images"):
        check_free(tmp_path, overwrite=True, inputs={"--images": world.photos})
    link = tmp_path / "link"
    link.symlink_to(world.embeddings)
    with pytest.raises(OutputIsInputError, match="is the input --embeddings"):
        check_free(link, overwrite=True, inputs={"--embeddings": world.embeddings})
    check_free(tmp_path / "new", overwrite=False, inputs={"--model": "0123456789abcdef0123456789abcdef"})  # a run id
    with pytest.raises(NotFgdistOutputError, match="symbolic link"):
        check_free(link, overwrite=True)  # a link is never fgdist's, even to an fgdist output
    assert (world.embeddings / MARKER).is_file()


def test_a_crashed_run_s_partial_folder_is_removed_only_if_marked(tmp_path):
    """(A failed run removes its own partial folder: tests/unit/test_search.py.)"""
    out = tmp_path / "out"
    users_folder(partial_path(out))  # a folder of theirs that happens to have the name
    with pytest.raises(NotFgdistOutputError, match=".out.partial was not written by fgdist"):
        with atomic_folder(out, overwrite=False):
            pass
    assert (partial_path(out) / "notes.txt").read_text() == "mine"
    shutil.rmtree(partial_path(out))  # by hand, as the message says
    (begin(out, overwrite=False) / "half.parquet").write_text("x")  # then a run killed midway
    with atomic_folder(out, overwrite=False) as partial:
        (partial / "done.txt").write_text("done")
    assert sorted(contents(out)) == [MARKER, "done.txt"] and not partial_path(out).exists()


def test_a_plain_file_is_never_replaced(tmp_path):
    file = tmp_path / "results.parquet"
    file.write_text("theirs")
    with pytest.raises(NotFgdistOutputError, match="is a file"):
        check_free(file, overwrite=True)
    with pytest.raises(OutputExistsError):  # what the commands catch
        check_free(file, overwrite=False)


def test_outputs_have_the_usual_modes(world):
    """0644 files and 0755 folders under umask 022 (safetensors writes 0600 on its own); a
    stricter umask is honoured."""
    for out in (world.model, world.embeddings, world.index, world.shards):
        folders = [out] + [p for p in out.rglob("*") if p.is_dir()]
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o755"}, out
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, out
    os.umask(0o077)
    with atomic_folder(world.model.parent / "private", overwrite=False) as partial:
        (partial / "a").write_text("x")
    assert (world.model.parent / "private").stat().st_mode & 0o777 == 0o700
    assert (world.model.parent / "private" / "a").stat().st_mode & 0o777 == 0o600


def test_atomic_file_replaces_only_a_complete_file(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(target) as partial:
            partial.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
    with atomic_file(target) as partial:
        partial.write_text("new")
        assert target.read_text() == "old"  # nothing under the final name until the block ends
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
