"""Recall@k on a hand-made neighbourhood, and evaluate() in one process (no process group)
against a float64 brute force."""

import pytest
import torch
from torch import nn

from fgdist.training.evaluation import evaluate, query_slice_sums


def test_recall_counts_a_miss_as_a_miss_when_k_exceeds_the_other_rows():
    # Three rows with three different labels: no query has a same-label neighbour at any k,
    # including k = 8, which is more than the 2 other rows there are.
    embeddings = torch.eye(3)
    sums = query_slice_sums(embeddings, {"fine": torch.tensor([0, 1, 2])}, 0, 3, ks=[1, 2, 8], chunk=2)
    assert sums["fine"][:3].tolist() == [0, 0, 0]


def test_recall_hits_at_the_rank_of_the_first_same_label_neighbour():
    # Query 0's neighbours by cosine similarity: row 1 (0.9), row 2 (0.5), row 3 (0.1); only
    # row 2 shares its label, so query 0 is a miss at k=1 and a hit from k=2 on.
    embeddings = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.5, 0.866], [0.1, 0.995]]), dim=1
    )
    labels = torch.tensor([7, 5, 7, 6])
    sums = query_slice_sums(embeddings, {"fine": labels}, 0, 1, ks=[1, 2, 3, 8], chunk=1)
    assert sums["fine"][:4].tolist() == [0, 1, 1, 1]


class TwoFeatures(nn.Module):
    """A model with a BatchNorm: its output depends on train/eval mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, images):
        return {"features": self.bn(images.flatten(1)[:, :2])}


def batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, 1, 1, generator=gen)
    return [{"images": images, "super": torch.tensor([0, 0, 1, 1, 2, 2]), "fine": torch.full((6,), -1)}]


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_leaves_the_model_in_the_mode_it_found(training):
    model = TwoFeatures().train(training)
    metrics = evaluate(model, batches(), "cpu", torch.float32, [1, 2], chunk=4, has_super_head=False)
    assert model.training is training
    assert metrics["eval_images"] == 6.0 and "fine_recall_at_1" not in metrics  # no fine labels


class Columns(nn.Module):
    """Features are the images' first DIM values, super-class logits the rest."""

    def forward(self, images):
        x = images.flatten(1)
        return {"features": x[:, :DIM], "super_logits": x[:, DIM:]}


DIM, SUPER_CLASSES = 8, 6


def brute_force_recall(features: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> list[float]:
    """Float64, full matrix, no sort or top-k: a query hits at k when fewer than k other rows are
    more similar than its most similar same-label row; none at all is a miss at every k."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    sims = x @ x.T
    others = ~torch.eye(len(x), dtype=torch.bool)
    out = []
    for k in ks:
        hits = 0
        for i in range(len(x)):
            same = others[i] & (labels == labels[i])
            if same.any():
                best = sims[i][same].max()
                hits += int((sims[i][others[i]] > best).sum()) < k
        out.append(100.0 * hits / len(x))
    return out


def test_evaluate_recall_and_top_k_equal_a_brute_force():
    gen = torch.Generator().manual_seed(3)
    n = 23
    images = torch.randn(n, DIM + SUPER_CLASSES, 1, 1, generator=gen)
    fine = (torch.arange(n) % 7)[torch.randperm(n, generator=gen)]  # 3 or 4 rows per label
    fine[-1] = 50  # a label with a single member (the others keep at least 2): a miss at every k
    sup = torch.randint(0, SUPER_CLASSES, (n,), generator=gen)
    # Tie-free: every query's similarities to the other rows are distinct (so no tie rule matters).
    x = torch.nn.functional.normalize(images.flatten(1)[:, :DIM].double(), dim=1)
    sims = (x @ x.T)[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    assert (sims.sort(dim=1).values.diff(dim=1) > 1e-6).all()
    ks = [1, 2, 5, 40]  # 40 > n - 1: every query with a same-label row is a hit there, the single one is not
    parts = [slice(0, 5), slice(5, 17), slice(17, n)]
    batches = [{"images": images[p], "super": sup[p], "fine": fine[p]} for p in parts]
    metrics = evaluate(Columns(), batches, "cpu", torch.float32, ks, chunk=4, has_super_head=True)

    for name, y in (("fine", fine), ("super", sup)):
        want = brute_force_recall(images.flatten(1)[:, :DIM], y, ks)
        assert [metrics[f"{name}_recall_at_{k}"] for k in ks] == pytest.approx(want, abs=1e-9)
    assert metrics["fine_recall_at_40"] == pytest.approx(100.0 * (n - 1) / n)  # only the single member misses
    assert metrics["fine_recall_at_1"] < metrics["fine_recall_at_5"]  # the data exercise more than one k
    logits = images.flatten(1)[:, DIM:]
    top5 = logits.topk(5, dim=1).indices
    assert metrics["super_top1"] == pytest.approx(100.0 * float((top5[:, 0] == sup).sum()) / n)
    assert metrics["super_top5"] == pytest.approx(100.0 * float((top5 == sup[:, None]).any(dim=1).sum()) / n)
    assert {"fine_map_at_r", "fine_r_precision", "super_map_at_r", "super_r_precision"} <= set(metrics)
    assert metrics["eval_images"] == float(n)
