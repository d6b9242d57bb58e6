"""Pictures from a tiny real model on tiny real shards: attention maps from layer3/layer4 hooks,
exact cosine top-5 neighbours, and the two PNG grids."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdist.config import validate
from fgdist.data.shardset import open_split
from fgdist.report.pictures import (
    CORRECT,
    WRONG,
    attention_maps,
    embed_split,
    log_pictures,
    nearest,
    neighbours,
    pick_queries,
    read_images,
)
from fgdist.retrieval_metrics import retrieval_pass
from fgdist.training.model import EmbeddingNet
from tests.helpers import tiny_synthetic, write_run_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    shards = root / "shards"
    tiny_synthetic(shards, train_per_fine=2, test_per_fine=3)
    cfg = validate({"model": {"width": 8}, "data": {"shards": str(shards), "num_workers": 1}}, "test")
    split = open_split(shards, "test")
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, split.manifest.num_super, None)
    return root, cfg, split, model


def test_log_pictures_writes_both_grids(setup, tmp_path):
    _, cfg, split, model = setup
    model.train()
    paths = log_pictures(model, split, cfg.data, tmp_path / "pics", "cpu", queries=5, batch_size=7)
    assert [p.name for p in paths] == ["attention.png", "retrieval.png"]
    assert model.training  # the caller's mode is restored
    sizes = {}
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG"
            sizes[p.name] = img.size
            pixels = np.asarray(img.convert("RGB"))
        assert pixels.std() > 20  # images and heat maps, not an empty canvas
        if p.name == "retrieval.png":
            outline = {
                tuple(int(CORRECT[i : i + 2], 16) for i in (1, 3, 5)),
                tuple(int(WRONG[i : i + 2], 16) for i in (1, 3, 5)),
            }
            flat = pixels.reshape(-1, 3)
            assert sum(int((flat == c).all(axis=1).sum()) for c in outline) > 5 * 5 * 4 * 20  # 25 outlined neighbours
    # 5 rows; attention has 3 columns, retrieval 1 query + 5 neighbours.
    assert sizes["attention.png"] == (480, 5 * 175)
    assert sizes["retrieval.png"] == (6 * 145, 5 * 165)


def test_attention_maps_from_the_later_stages(setup):
    _, cfg, split, model = setup
    images = read_images(split, cfg.data, pick_queries(split, 3))
    batch = torch.stack([t.image for t in images.values()])
    maps = attention_maps(model, batch)
    assert set(maps) == {"layer3", "layer4"}
    assert maps["layer3"].shape == (3, 8, 8) and maps["layer4"].shape == (3, 4, 4)  # 32x32, cifar stem
    assert (maps["layer4"] >= 0).all() and maps["layer4"].sum() > 0
    # The same through the bare backbone (hooks on the same modules).
    again = attention_maps(model.backbone, batch)
    assert torch.allclose(again["layer4"], maps["layer4"])


def test_neighbours_are_exact_cosine_top5(setup):
    _, cfg, split, model = setup
    queries = pick_queries(split, 4)
    assert len(queries) == 4 and queries == sorted(set(queries))
    supers = {
        next(s.id for s in split.manifest.super_classes if s.instance_begin <= q < s.instance_end) for q in queries
    }
    assert len(supers) == 4  # spread over the super-classes
    found = nearest(model, split, cfg.data, queries, k=5, batch_size=5)
    feats, ids = embed_split(model, split, cfg.data, batch_size=9)
    pos = {int(i): p for p, i in enumerate(ids)}
    for q, row in zip(queries, found):
        sims = feats @ feats[pos[q]]
        sims[pos[q]] = -2.0
        expected = sims.topk(5).values
        assert q not in [i for i, _ in row]
        assert torch.allclose(torch.tensor([s for _, s in row]), expected, atol=1e-6)
        assert all(abs(float(feats[pos[i]] @ feats[pos[q]]) - s) < 1e-6 for i, s in row)


def test_neighbours_break_ties_as_the_metrics_do():
    """Many test images equally similar to the query: the grid shows the ones the metrics rank
    first (the lower rows), so its first same-label neighbour stands at the query's first rank
    in Recall@k; a top-k selection picks among the tied rows in another order."""
    feats = torch.tensor([[1.0, 0.0]]).repeat(40, 1)
    feats[0] = feats[30] = torch.tensor([0.8, 0.6])  # the query, and the one row nearer than the tie
    ids = torch.arange(40) + 100
    labels = torch.zeros(40, dtype=torch.long)
    labels[0] = labels[12] = 1  # the query's one same-label image, inside the tie
    found = neighbours(feats, ids, [100], k=13)[0]
    assert [i for i, _ in found] == [130, *range(101, 113)]
    assert [round(s, 6) for _, s in found] == [1.0] + [0.8] * 12
    _, values = retrieval_pass(feats[:1], {"fine": labels[:1]}, feats, {"fine": labels}, [1, 13], self_offset=0)
    assert [i for i, _ in found].index(112) + 1 == int(values["fine"]["first_rank"][0]) == 13


def test_load_checkpoint_model_names_what_it_returns(setup, tmp_path):
    """A checkpoint in the trainer's layout (docs/DESIGN.md, "The checkpoint layout"): the model
    comes back with the saved weights, the run's config, and the checkpoint folder it read."""
    from fgdist.training.checkpoint import load_checkpoint_model

    _, cfg, _, model = setup
    run_dir = tmp_path / "run"
    folder = write_run_folder(run_dir, cfg, model)
    for where in (run_dir, folder):  # a run folder (its newest checkpoint) or the checkpoint itself
        loaded = load_checkpoint_model(where)
        assert loaded.folder == folder and loaded.config == cfg
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key


def test_a_run_folder_whose_newest_checkpoint_is_not_the_end_says_so(setup, tmp_path, caplog):
    """A run stopped after epoch 1 of 3: its newest checkpoint loads, with a warning naming the epoch;
    a finished run's loads without one."""
    from fgdist.training.checkpoint import load_checkpoint_model

    _, cfg, _, model = setup
    stopped, finished = tmp_path / "stopped", tmp_path / "finished"
    three_epochs = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 3})})
    write_run_folder(stopped, three_epochs, model, epoch=1)
    write_run_folder(finished, cfg, model)
    with caplog.at_level("WARNING", logger="fgdist.training.checkpoint"):
        load_checkpoint_model(finished)
        assert not caplog.records
        load_checkpoint_model(stopped)
    [record] = caplog.records
    assert "after epoch 1 of 3" in record.message and str(stopped) in record.message


def test_fgdist_export_of_a_run_folder_without_a_checkpoint_is_one_named_error(setup, tmp_path, capsys):
    from fgdist.retrieval.export import main as export_main

    _, cfg, _, _ = setup
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.model_dump_json())
    assert export_main(["--model", str(run), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert err.count(str(run)) == 1 and "saved no checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "exported").exists()


def test_a_checkpoint_whose_meta_json_is_not_a_position_is_named(setup, tmp_path):
    from fgdist.search_errors import CheckpointError
    from fgdist.training.checkpoint import load_checkpoint_model

    _, cfg, _, model = setup
    meta = write_run_folder(tmp_path / "run", cfg, model) / "meta.json"
    meta.write_text(meta.read_text()[:20])  # cut off mid-write by something other than fgdist
    with pytest.raises(CheckpointError, match=f"{meta}: not a checkpoint position"):
        load_checkpoint_model(tmp_path / "run")
