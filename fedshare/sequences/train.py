"""Next-item training (CAU paper Sec. 5.1.4): full-softmax cross-entropy, Adam, batch 256.

A window ``[S, L + 1]`` (see :meth:`SequenceData.windows`) gives inputs ``w[:, :-1]`` and targets
``w[:, 1:]``: every position with a non-empty prefix predicts the next item, so a session of n
items yields n - 1 predictions per epoch (within its window). The loss is the mean over those
prediction points of the batch. Full softmax (not sampled) because CAU's KL term needs the full
distribution.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedshare.sequences.data import PAD, TRAIN, VALID, SequenceData
from fedshare.sequences.evaluate import evaluate
from fedshare.sequences.models import SequenceModel


def next_item_loss(model: SequenceModel, windows: Tensor) -> Tensor:
    """Mean cross-entropy of every next item given its prefix (pads and empty prefixes skipped)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    predict = (inputs != PAD) & (targets != PAD)
    hidden = model(inputs)[predict]
    return F.cross_entropy(model.scores(hidden), targets[predict])


def train_epoch(model: SequenceModel, windows: Tensor, optimizer: torch.optim.Optimizer, *,
                batch_size: int = 256, generator: torch.Generator | None = None) -> float:
    """One shuffled pass over ``windows``; returns the mean of the batch losses."""
    model.train()
    order = torch.randperm(len(windows), generator=generator)
    losses = []
    for start in range(0, len(windows), batch_size):
        batch = windows[order[start:start + batch_size]]
        loss = next_item_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


@dataclass
class TrainResult:
    """What a centralised run did: per-epoch loss and validation metrics, the best epoch."""

    losses: list[float] = field(default_factory=list)
    valid: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)


def train_central(model: SequenceModel, data: SequenceData, *, epochs: int = 200,
                  lr: float = 1e-3, batch_size: int = 256, patience: int = 10,
                  metric: str = "recall@10", seed: int = 0, device: str = "cpu",
                  progress: Callable[[int, float, dict[str, float]], None] | None = None,
                  ) -> TrainResult:
    """Train on the TRAIN sessions, stop when validation ``metric`` has not improved for
    ``patience`` epochs, and leave ``model`` holding its best-validation weights.

    Seeded (shuffling and dropout), hence repeatable on CPU.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    train = torch.from_numpy(data.windows(TRAIN)).to(device)
    valid = torch.from_numpy(data.windows(VALID)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result, best_state, waited = TrainResult(), None, 0
    for epoch in range(epochs):
        started = time.perf_counter()
        loss = train_epoch(model, train, optimizer, batch_size=batch_size, generator=generator)
        result.epoch_seconds.append(time.perf_counter() - started)
        scores = evaluate(model, valid)
        result.losses.append(loss)
        result.valid.append(scores)
        if progress is not None:
            progress(epoch, loss, scores)
        if best_state is None or scores[metric] > result.best_valid[metric]:
            result.best_epoch, result.best_valid = epoch, scores
            best_state, waited = copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
