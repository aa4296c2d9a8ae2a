"""Centralised reference: one machine, all training data, the ceiling of the federated runs.

Models: ``popularity`` (training-set item counts), ``mf`` (BPR matrix factorisation) and
``lightgcn`` (L = 3). Both learned models use dot-product BPR with sampled negatives, Adam,
and model selection by validation NDCG@20, evaluated every ``eval_every`` epochs with early
stopping; test metrics are those of the chosen epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedshare.data.split import Split
from fedshare.graph import BipartiteGraph
from fedshare.losses import bpr_loss, l2_penalty
from fedshare.metrics import embedding_scorer, evaluate_topk
from fedshare.models.lightgcn import LightGCN
from fedshare.sampling import sample_negatives


@dataclass(frozen=True)
class CentralConfig:
    """Training settings of the centralised reference (chosen on ML-100K validation)."""

    dim: int = 32
    num_layers: int = 3
    lr: float = 5e-3
    reg: float = 1e-4
    batch_size: int = 2048
    max_epochs: int = 300
    eval_every: int = 5
    patience: int = 6
    seed: int = 0


@dataclass
class CentralResult:
    model: str
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    seconds: float
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluate(split: Split, users: torch.Tensor, items: torch.Tensor) -> tuple[dict, dict]:
    scorer = embedding_scorer(users, items)
    valid = evaluate_topk(scorer, split.valid, [split.train])
    test = evaluate_topk(scorer, split.test, [split.train, split.valid])
    return valid, test


def popularity(split: Split) -> CentralResult:
    start = time.perf_counter()
    counts = torch.from_numpy(split.train.item_degrees()).float()
    items = counts[:, None]
    users = torch.ones(split.num_users, 1)
    valid, test = _evaluate(split, users, items)
    return CentralResult("popularity", 0, valid, test, time.perf_counter() - start, {})


def train_bpr(split: Split, model_name: str, config: CentralConfig | None = None,
              progress: Callable[[int, dict], None] | None = None) -> CentralResult:
    """Train MF (``num_layers = 0``) or LightGCN with BPR; select the epoch on validation."""
    config = config or CentralConfig()
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    layers = config.num_layers if model_name == "lightgcn" else 0
    generator = torch.Generator().manual_seed(config.seed)
    model = LightGCN(split.num_users, split.num_items, config.dim, layers, generator)
    graph = BipartiteGraph(split.train) if layers else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    users, items = split.train.users, split.train.items
    known = np.unique(users * split.num_items + items)
    rng = np.random.default_rng(config.seed)
    best: tuple = (-1.0, 0, None, None)
    bad = 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(len(users))
        negatives = sample_negatives(users, np.arange(len(users)), known, split.num_items,
                                     config.seed, epoch)
        model.train()
        for s in range(0, len(order), config.batch_size):
            idx = torch.from_numpy(order[s:s + config.batch_size])
            u, i = torch.from_numpy(users)[idx], torch.from_numpy(items)[idx]
            j = torch.from_numpy(negatives)[idx]
            all_u, all_i = model(graph)
            loss = bpr_loss((all_u[u] * all_i[i]).sum(1), (all_u[u] * all_i[j]).sum(1)).mean()
            reg = l2_penalty(model.user[u], model.item[i], model.item[j]) / len(idx)
            optimizer.zero_grad()
            (loss + config.reg * reg).backward()
            optimizer.step()
        if epoch % config.eval_every and epoch != config.max_epochs:
            continue
        model.eval()
        with torch.no_grad():
            valid, test = _evaluate(split, *model(graph))
        if progress is not None:
            progress(epoch, valid)
        if valid["ndcg@20"] > best[0]:
            best = (valid["ndcg@20"], epoch, valid, test)
            bad = 0
        else:
            bad += 1
            if bad >= config.patience:
                break
    _, epoch, valid, test = best
    return CentralResult(model_name, epoch, valid, test, time.perf_counter() - start,
                         asdict(config))


def run_central(split: Split, model_name: str, config: CentralConfig | None = None,
                progress: Callable[[int, dict], None] | None = None) -> CentralResult:
    if model_name == "popularity":
        return popularity(split)
    return train_bpr(split, model_name, config, progress)
