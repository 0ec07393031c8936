"""Shared distillation fixtures (one intra-op thread for this folder: tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from difflab import CFGDenoiser, GaussianMixture
from difflab.distill import GuidedDistillConfig, GuidedStudent, PredictionDenoiser, dataset_batches, distill_guided
from difflab.nets import MLP


@pytest.fixture(scope="session")
def distilled():
    """(labelled mixture, stage-1 MLP student distilled from its exact guided teacher, training data, labels).
    Shared by the stage-1 and stage-2 tests (400 steps, ~10 s)."""
    means = [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]]
    stds = [[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]]
    mixture = GaussianMixture(means, stds, [0.5, 0.3, 0.2], labels=[0, 1, 1])     # class 1: two components
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (20_000,), generator=gen)
    x = mixture.sample(20_000, generator=gen, class_labels=labels)
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=64, depth=2, embed_dim=32, num_classes=2, extra_embed=True)
    student = GuidedStudent(PredictionDenoiser(net, "v", sigma_min=0.002, sigma_max=80.0, data_shape=(2,)))
    config = GuidedDistillConfig(train_steps=400, lr=1e-2, warmup_steps=50, ema_decay=0.99, checkpoint_every=10**6,
                                 device="cpu", batch_size=128, w_range=(0.0, 4.0))
    trained = distill_guided(CFGDenoiser(mixture), student, dataset_batches(x, labels), config, progress=False).model
    torch.set_num_threads(threads)
    return mixture, trained, x, labels
