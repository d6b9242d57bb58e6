"""Labels, class names and source paths from the images to every search result; index folders
that move; the named errors of a broken index (see also test_search.py)."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fgdist.embeddings_io import read_embeddings
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import load_model
from fgdist.retrieval.search import RESULT_FIELDS, index_main, open_index, search_main
from fgdist.retrieval_metrics import retrieval_sums, to_metrics
from fgdist.search_errors import IndexFolderError
from shards.build import build_shards
from shards.sources.files import open_folder, open_manifest
from tests.unit.test_search import fake_run, tiny_config

faiss = pytest.importorskip("faiss")


def write_image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


TREE = ["kettle/red/1.png", "kettle/red/2.png", "kettle/blue/3.png", "mug/white/4.png", "loose.png"]


def embedded_tree(tmp_path, names=TREE):
    """A run, a `<super>/<fine>/` folder with one unlabelled image at its root, its embeddings and index."""
    run, _ = fake_run(tmp_path, tiny_config(tmp_path))
    photos = tmp_path / "photos"
    for i, name in enumerate(names):
        write_image(photos / name, i)
    emb, index = tmp_path / "emb", tmp_path / "index"
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(emb), "--quiet"]) == 0
    assert index_main(["--embeddings", str(emb), "--out", str(index)]) == 0
    return run, photos, emb, index


def test_folder_labels_names_and_paths_reach_embeddings_rows_and_results(tmp_path):
    run, photos, emb_dir, index_dir = embedded_tree(tmp_path)
    emb = read_embeddings(emb_dir)
    by_key = {k: i for i, k in enumerate(emb.keys)}
    row = by_key["kettle/blue/3.png"]
    # the ids `shards build --source folder` gives the same tree (names sorted: kettle 0, mug 1)
    assert (int(emb.labels["super"][row]), int(emb.labels["fine"][row])) == (0, 0)
    assert emb.column("super_name")[row] == "kettle" and emb.column("fine_name")[row] == "kettle/blue"
    assert emb.column("path")[row] == "kettle/blue/3.png"
    loose = by_key["loose.png"]
    assert (int(emb.labels["super"][loose]), int(emb.labels["fine"][loose])) == (-1, -1)
    assert emb.column("super_name")[loose] is None and emb.column("path")[loose] == "loose.png"

    rows = pq.read_table(index_dir / "rows.parquet").to_pylist()
    assert {r["key"]: (r["super_name"], r["fine_name"], r["path"]) for r in rows}["mug/white/4.png"] == (
        "mug",
        "mug/white",
        "mug/white/4.png",
    )
    idx = open_index(index_dir)
    embedder = load_model(idx.model_source)
    query = embedder(embedder.preprocess([Image.open(photos / "mug/white/4.png")])).detach().numpy()
    found = idx.neighbours(query, 10)[0]
    assert len(found) == len(TREE) and [n["rank"] for n in found] == list(range(1, len(TREE) + 1))
    assert all(list(n) == list(RESULT_FIELDS) for n in found)
    assert found[0] == {
        "rank": 1,
        "key": "mug/white/4.png",
        "score": pytest.approx(1.0, abs=1e-5),
        "super": 1,
        "fine": 2,
        "super_name": "mug",
        "fine_name": "mug/white",
        "path": "mug/white/4.png",
    }
    assert idx.image_bytes("mug/white/4.png") == (photos / "mug/white/4.png").read_bytes()
    with pytest.raises(KeyError, match="nope.png"):
        idx.image_bytes("nope.png")
    with pytest.raises(ValueError, match="k must be >= 1"):
        idx.neighbours(query, 0)


def test_an_index_moved_with_its_images_and_model_still_searches(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    run, photos, emb_dir, index_dir = embedded_tree(home)
    meta = json.loads((index_dir / "index.json").read_text())
    assert meta["model"] == "../run" and meta["images"]["root"] == "../photos" and meta["embeddings"] == "../emb"
    moved = tmp_path / "elsewhere"
    shutil.move(home, moved)
    idx = open_index(moved / "index")
    assert idx.model_source == str(moved / "run") and idx.images["root"] == str(moved / "photos")
    assert idx.image_bytes("kettle/red/2.png") == (moved / "photos/kettle/red/2.png").read_bytes()
    capsys.readouterr()
    args = ["--index", str(moved / "index"), "--image", str(moved / "photos/kettle/red/2.png"), "--k", "2"]
    assert search_main([*args, "--grid", str(tmp_path / "grid.png")]) == 0
    header, first, *_ = capsys.readouterr().out.splitlines()
    assert header.split("\t") == ["rank", "score", "key", "super", "fine", "super_name", "fine_name", "path"]
    assert first.split("\t") == [
        "1",
        "1.0000",
        "kettle/red/2.png",
        "0",
        "1",
        "kettle",
        "kettle/red",
        "kettle/red/2.png",
    ]


def test_an_index_with_absolute_paths_still_opens(tmp_path):
    """index.json written before paths were relative: absolute paths are taken as they are."""
    run, photos, emb_dir, index_dir = embedded_tree(tmp_path)
    meta = json.loads((index_dir / "index.json").read_text())
    meta.update(model=str(run), images={**meta["images"], "root": str(photos)})
    (index_dir / "index.json").write_text(json.dumps(meta))
    idx = open_index(index_dir)
    assert idx.model_source == str(run) and idx.image_bytes("loose.png") == (photos / "loose.png").read_bytes()


def test_manifest_integer_labels_keep_their_ids_and_names_stay_names(tmp_path):
    """Integer labels 0, 2, 10 are ids 0, 2, 10 in the shards and the embeddings alike (ids 1 and
    3..9 are empty classes named by their number); names get sorted-name ids in both."""
    for i in range(4):
        write_image(tmp_path / f"{i}.png", i)
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("path,super,fine,split\n0.png,0,0,train\n1.png,2,5,train\n2.png,10,7,test\n3.png,2,5,test\n")
    collection = open_manifest(str(numbers))
    assert len(collection.super_names) == 11 and collection.super_names[10] == "10"
    assert [(r.super_id, r.fine_id) for r in collection.splits["train"]] == [(0, 0), (2, 5)]
    assert collection.fine_to_super[5] == 2 and collection.fine_to_super[1] == -1  # an unused fine id
    build_shards(collection, tmp_path / "shards", progress=False)
    index = pq.read_table(tmp_path / "shards" / "test" / "index.parquet")
    assert sorted(index.column("super_id").to_pylist()) == [2, 10]

    run, _ = fake_run(tmp_path, tiny_config(tmp_path))
    assert embed_main(["--model", str(run), "--manifest", str(numbers), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    emb = read_embeddings(tmp_path / "e")
    assert emb.labels["super"].tolist() == [0, 2, 10, 2] and emb.labels["fine"].tolist() == [0, 5, 7, 5]
    assert emb.column("super_name") == ["0", "2", "10", "2"] and emb.column("path") == [f"{i}.png" for i in range(4)]

    names = tmp_path / "names.csv"
    names.write_text("path,super,fine\n0.png,mug,white\n1.png,kettle,red\n2.png,mug,blue\n")
    assert embed_main(["--model", str(run), "--manifest", str(names), "--out", str(tmp_path / "n"), "--quiet"]) == 0
    emb = read_embeddings(tmp_path / "n")
    assert emb.labels["super"].tolist() == [1, 0, 1] and emb.labels["fine"].tolist() == [2, 1, 0]
    assert emb.column("fine_name") == ["white", "red", "blue"]
    assert [c for c in open_manifest(str(names)).super_names] == ["kettle", "mug"]


def test_very_sparse_integer_labels_are_numbered_in_numeric_order(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,super\n0.png,3000000\n1.png,20\n2.png,100\n")
    collection = open_manifest(str(manifest))
    assert collection.super_names == ["20", "100", "3000000"]
    assert [r.super_id for r in collection.splits["train"]] == [2, 0, 1]


def test_shard_embeddings_carry_manifest_names_and_sources(tmp_path):
    tree = tmp_path / "tree"
    for i, name in enumerate(
        ["train/cup/tall/1.png", "train/pot/iron/2.png", "test/cup/tall/3.png", "test/pot/iron/4.png"]
    ):
        write_image(tree / name, i)
    build_shards(open_folder(str(tree)), tmp_path / "shards", progress=False)
    run, _ = fake_run(tmp_path, tiny_config(tmp_path))
    emb_dir, index_dir = tmp_path / "emb", tmp_path / "index"
    args = ["--model", str(run), "--shards", str(tmp_path / "shards"), "--split", "test", "--out", str(emb_dir)]
    assert embed_main([*args, "--quiet"]) == 0
    emb = read_embeddings(emb_dir)
    assert emb.column("super_name") == ["cup", "pot"] and emb.column("fine_name") == ["cup/tall", "pot/iron"]
    assert emb.column("path") == [str(tree / "test/cup/tall/3.png"), str(tree / "test/pot/iron/4.png")]
    assert index_main(["--embeddings", str(emb_dir), "--out", str(index_dir)]) == 0
    idx = open_index(index_dir)
    assert idx.image_bytes(emb.keys[1]) == (tree / "test/pot/iron/4.png").read_bytes()
    found = idx.neighbours(emb.vectors[:1].numpy(), 5)[0]
    assert found[0]["path"] == str(tree / "test/cup/tall/3.png") and len(found) == 2


def test_a_missing_or_corrupt_index_file_is_one_named_error(tmp_path, capsys):
    run, photos, _, index_dir = embedded_tree(tmp_path)
    faiss_file = index_dir / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:40])
    with pytest.raises(IndexFolderError, match="index.faiss: unreadable faiss index"):
        open_index(index_dir)
    args = ["--index", str(index_dir), "--image", str(photos / "loose.png")]
    for problem in ("unreadable faiss index", "missing"):
        capsys.readouterr()
        assert search_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: IndexFolderError: ") and problem in err
        faiss_file.unlink(missing_ok=True)


def test_k_below_one_is_one_named_error(tmp_path, capsys):
    run, photos, _, index_dir = embedded_tree(tmp_path)
    for k in ("0", "-3"):
        capsys.readouterr()
        assert search_main(["--index", str(index_dir), "--image", str(photos / "loose.png"), "--k", k]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--k {k}: k must be >= 1" in err


def printed_neighbours(capsys, index_dir, image, k):
    capsys.readouterr()
    assert search_main(["--index", str(index_dir), "--image", str(image), "--k", str(k)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


def test_batch_queries_equal_single_queries_and_score_by_class_name(tmp_path, capsys):
    run, photos, emb_dir, index_dir = embedded_tree(tmp_path)
    # Queries of their own: `mug` is super id 0 in their own class table but 1 in the index's; `tea`
    # is a class the index does not have.
    queries = tmp_path / "queries"
    for name, source in [("mug/white/q1.png", "mug/white/4.png"), ("kettle/red/q2.png", "kettle/red/1.png")]:
        (queries / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / source, queries / name)
    write_image(queries / "tea/green/q3.png", 99)
    out = tmp_path / "results.parquet"
    capsys.readouterr()
    argv = ["--index", str(index_dir), "--queries", str(queries), "--out", str(out), "--k", "3", "--quiet"]
    assert search_main([*argv, "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    results = pq.read_table(out).to_pylist()
    assert len(results) == 3 * 3
    for query in ("kettle/red/q2.png", "mug/white/q1.png", "tea/green/q3.png"):
        mine = [r for r in results if r["query_key"] == query]
        single = printed_neighbours(capsys, index_dir, queries / query, 3)
        assert [r["key"] for r in mine] == [s["key"] for s in single] and [r["rank"] for r in mine] == [1, 2, 3]
        assert [r["score"] for r in mine] == pytest.approx([float(s["score"]) for s in single], abs=1e-4)
        assert all(r["query_path"] == query and r["query_super_name"] == query.split("/")[0] for r in mine)
        assert [r["path"] for r in mine] == [s["path"] for s in single]
    mug = next(r for r in results if r["query_key"] == "mug/white/q1.png")
    assert (mug["query_super"], mug["query_fine"], mug["key"], mug["super_name"]) == (1, 2, "mug/white/4.png", "mug")
    tea = next(r for r in results if r["query_key"] == "tea/green/q3.png")
    assert (tea["query_super"], tea["query_fine"], tea["query_fine_name"]) == (-1, -1, "tea/green")

    # The printed metrics are those of retrieval_metrics over the exact similarities, with the
    # query labels in the index's ids (tea: a labelled query without a relevant row).
    gallery = read_embeddings(emb_dir)
    embedder = load_model(run)
    names = ["kettle/red/q2.png", "mug/white/q1.png", "tea/green/q3.png"]
    q = embedder(embedder.preprocess([Image.open(queries / n) for n in names])).detach()
    labels = {"super": torch.tensor([0, 1, -1]), "fine": torch.tensor([1, 2, -1])}
    ks = [1, 2]
    want = to_metrics(retrieval_sums(q, labels, gallery.vectors, gallery.labels, ks), ks)
    lines = {line.split(":")[0]: line for line in printed}
    for name in ("super", "fine"):
        line = lines[name]
        assert "R@4" not in line and line.endswith("(3 labelled queries)")
        for k in ks:
            assert f"R@{k} {want[f'{name}_recall_at_{k}']:.2f}" in line
        assert f"MAP@R {want[f'{name}_map_at_r']:.2f}" in line
        assert f"R-precision {want[f'{name}_r_precision']:.2f}" in line


def test_unlabelled_queries_refuse_metrics_and_print_none_without(tmp_path, capsys):
    run, photos, emb_dir, index_dir = embedded_tree(tmp_path)
    manifest = tmp_path / "queries.csv"
    manifest.write_text("path\nphotos/loose.png\nphotos/mug/white/4.png\n")
    argv = ["--index", str(index_dir), "--queries", str(manifest), "--k", "2", "--quiet"]
    capsys.readouterr()
    assert search_main([*argv, "--out", str(tmp_path / "r1"), "--metrics"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: UnlabelledQueriesError: --metrics: the queries")
    assert not (tmp_path / "r1").exists()
    assert search_main([*argv, "--out", str(tmp_path / "r2")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"results written to {tmp_path / 'r2'}"]
    results = pq.read_table(tmp_path / "r2").to_pylist()
    assert [r["query_path"] for r in results] == ["photos/loose.png"] * 2 + ["photos/mug/white/4.png"] * 2
    assert results[2]["key"] == "mug/white/4.png" and results[2]["query_super"] == -1
    # an existing output is refused; --queries without --out, --out with --image are named
    assert search_main([*argv, "--out", str(tmp_path / "r2")]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    assert search_main(argv) == 2 and "--queries needs --out" in capsys.readouterr().err
    image = ["--index", str(index_dir), "--image", str(photos / "loose.png"), "--out", str(tmp_path / "r3")]
    assert search_main(image) == 2 and "--out: only with --queries" in capsys.readouterr().err

    from fgdist.retrieval_metrics import main as metrics_main

    assert embed_main(["--model", str(run), "--manifest", str(manifest), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    capsys.readouterr()
    assert metrics_main(["--embeddings", str(tmp_path / "q"), "--gallery", str(emb_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UnlabelledQueriesError" in err


def outline_pixels(path, colour: str) -> int:
    rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    with Image.open(path) as img:
        return int((np.asarray(img.convert("RGB")).reshape(-1, 3) == rgb).all(axis=1).sum())


def test_grid_outlines_unknown_labels_grey_not_green(tmp_path):
    """-1 == -1 is not "the same super-class": unknown labels are outlined grey."""
    from fgdist.report.pictures import CORRECT, UNKNOWN, WRONG, TestImage, retrieval_grid

    torch.manual_seed(0)
    image = lambda s, f: TestImage(0, s, f, torch.randn(3, 16, 16))  # noqa: E731
    found = [(image(-1, -1), 0.9), (image(-1, -1), 0.8)]
    retrieval_grid([image(-1, -1)], [found], tmp_path / "unknown.png")
    assert (
        outline_pixels(tmp_path / "unknown.png", CORRECT) == 0
        and outline_pixels(tmp_path / "unknown.png", UNKNOWN) > 100
    )
    labelled = [(image(2, -1), 0.9), (image(3, -1), 0.8), (image(-1, -1), 0.7)]
    retrieval_grid([image(2, -1)], [labelled], tmp_path / "known.png")
    for colour in (CORRECT, WRONG, UNKNOWN):
        assert outline_pixels(tmp_path / "known.png", colour) > 100


def test_batch_results_do_not_depend_on_how_queries_are_split(tmp_path, capsys, monkeypatch):
    """Queries embedded CHUNK at a time and searched SEARCH_BUDGET // depth at a time give the
    same rows and metrics as one pass."""
    from fgdist.retrieval import search_batch

    run, photos, emb_dir, index_dir = embedded_tree(tmp_path)
    argv = ["--index", str(index_dir), "--queries", str(photos), "--k", "4", "--quiet"]
    capsys.readouterr()
    assert search_main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = capsys.readouterr().out.splitlines()[1:]
    monkeypatch.setattr(search_batch, "CHUNK", 3)
    monkeypatch.setattr(search_batch, "SEARCH_BUDGET", 5)  # depth 4 or 5: one query per search
    assert search_main([*argv, "--out", str(tmp_path / "split")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == whole and len(whole) == 2
    a, b = (pq.read_table(tmp_path / name).to_pylist() for name in ("whole", "split"))
    assert len(a) == len(TREE) * 4 and [r["key"] for r in a] == [r["key"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)
