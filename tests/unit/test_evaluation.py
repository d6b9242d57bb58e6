"""Recall@k on a hand-made neighbourhood, and evaluate() in one process (no process group)."""

import pytest
import torch
from torch import nn

from fgdist.evaluation import evaluate, recall_at_k


def test_recall_counts_a_miss_as_a_miss_when_k_exceeds_the_other_rows():
    # Three rows with three different labels: no query has a same-label neighbour at any k,
    # including k = 8, which is more than the 2 other rows there are.
    embeddings = torch.eye(3)
    hits = recall_at_k(embeddings, {"fine": torch.tensor([0, 1, 2])}, 0, 3, ks=[1, 2, 8], chunk=2)
    assert hits["fine"].tolist() == [0, 0, 0]


def test_recall_hits_at_the_rank_of_the_first_same_label_neighbour():
    # Query 0's neighbours by cosine similarity: row 1 (0.9), row 2 (0.5), row 3 (0.1); only
    # row 2 shares its label, so query 0 is a miss at k=1 and a hit from k=2 on.
    embeddings = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.5, 0.866], [0.1, 0.995]]), dim=1
    )
    labels = torch.tensor([7, 5, 7, 6])
    hits = recall_at_k(embeddings, {"fine": labels}, 0, 1, ks=[1, 2, 3, 8], chunk=1)
    assert hits["fine"].tolist() == [0, 1, 1, 1]


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
