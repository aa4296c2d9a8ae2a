"""CDCGNNFed's graph mending (Qu et al., WWW 2024): predicted missing edges added to G_s.

Why: a partial sharer uploads only part of its history, so the server's graph G_s lacks edges
that exist; CDCGNNFed "mends" it by predicting missing user-item links and propagating over
the mended graph. The paper has no public code and FedShare describes the step in one line
(a server-side strategy "to predict potentially missing user-item interactions"); the project's
spec adds: drop uploaded edges ("impairing"), train a link predictor to recover them, add
predicted missing edges before propagation. This module is that procedure, as interpreted here:

1. **Impair.** Drop ``drop * |D_s|`` edges of D_s (rounded half up, at most ``|D_s| - 1``):
   those whose seeded hash ``counter_uniform(seed, MEND_KEY, user * |I| + item)`` is smallest.
   The hash is a function of the edge and the seed alone, so D_s's order does not matter and
   after unsharing the remaining edges keep their places in the same ranking.
2. **Fit.** A link predictor trains on the kept edges (:class:`LightGCNLinkPredictor` by
   default; any :class:`LinkPredictor` can be injected); the dropped edges are its held-out
   targets, the usual link-prediction split (PyG's ``RandomLinkSplit`` makes the same one).
   Training on the dropped edges instead would leave nothing to measure the predictor on.
3. **Check.** The selection rule of step 4, applied to the impaired graph, adds edges back;
   the dropped ones among them are *recovered* (recall = recovered / dropped, precision =
   recovered / added to the impaired graph). ``pair_accuracy``: the share of dropped edges
   scored above a sampled pair of the same user that is not in D_s (an AUC estimate). The
   dropped edges were never trained on, so these are held-out figures.
4. **Mend.** The same predictor propagates over all of D_s (no retraining: a LightGCN
   predictor's parameters are its ego embeddings, so the full graph only adds neighbours) and
   scores every pair of U_s x I_s (users and items with an edge in D_s) that is not in D_s.
   Pairs with probability ``>= threshold`` are added, highest first (ties by ``user * |I| +
   item``), at most ``floor(ratio * |D_s|)`` of them: the cap keeps a permissive threshold from
   turning G_s into a dense graph. Candidates never leave U_s x I_s: a mended edge never
   reaches a user who shared nothing or an item no one shared, so the server's node sets and
   G_s's item set (InfoNCE's items, Eq. 17) are those of D_s.

When it runs: whenever the server's D_s is set (:meth:`fedshare.federated.server.Server.
set_shared`): after the share round and again after unsharing (Eq. 19-20), from the remaining
D_s and a fresh predictor, so no mended edge is derived from unshared data. The result is a
pure function of (D_s, settings), so a resumed run rebuilds it instead of storing it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedshare.data.interactions import Interactions
from fedshare.graph import BipartiteGraph
from fedshare.losses import sampled_rows_l2
from fedshare.models.embeddings import xavier_table
from fedshare.sampling import counter_hash, counter_uniform, sample_negatives

if TYPE_CHECKING:
    from fedshare.federated.config import FederatedConfig

MEND_KEY = 0x4D454E44
"""``"MEND"``: keys the mending's draws apart from every other stream of the run."""
SCORE_ELEMENTS = 1 << 22
"""Scores computed at once (users per chunk x items): bounds memory on large catalogues."""


@dataclass(frozen=True)
class MendSettings:
    """The mending's knobs (run-config keys ``mend-drop``, ``mend-threshold``, ``mend-ratio``,
    ``mend-epochs``; the predictor shares the run's ``dim``, ``num-layers``, ``seed`` and
    ``server-batch-size``).

    Args:
        drop: fraction of D_s's edges dropped to impair the graph, in [0, 1).
        threshold: least predicted probability of an added edge, in (0, 1).
        ratio: at most ``floor(ratio * |D_s|)`` edges are added (0: none).
        epochs: passes of the predictor's training over the kept edges.
        lr, reg: the predictor's Adam step and L2 weight (fixed: not tuned).
    """

    drop: float = 0.1
    threshold: float = 0.9
    ratio: float = 0.1
    epochs: int = 20
    dim: int = 32
    num_layers: int = 3
    seed: int = 0
    batch_size: int = 2048
    lr: float = 0.01
    reg: float = 1e-4

    @classmethod
    def from_config(cls, config: FederatedConfig) -> MendSettings:
        return cls(config.mend_drop, config.mend_threshold, config.mend_ratio,
                   config.mend_epochs, config.dim, config.num_layers, config.seed,
                   config.server_batch_size)


class LinkPredictor(Protocol):
    """What the mending needs of a link predictor (ids are the compact ones of
    :func:`mend`: users index U_s, items index I_s)."""

    def fit(self, kept: Interactions) -> None:
        """Train on the impaired graph's edges."""

    def probabilities(self, graph: Interactions, users: np.ndarray) -> np.ndarray:
        """``P(edge)`` of every (user, item) pair for ``users`` (rows) and every item
        (columns), with message passing over ``graph``."""


class LightGCNLinkPredictor:
    """LightGCN encoder (PyG's normalisation and ``LGConv``, :class:`BipartiteGraph`) with a
    dot-product decoder and ``sigmoid`` on top, trained with binary cross-entropy: each kept
    edge against one item drawn uniformly among those its user has no kept edge with.

    Why cross-entropy and not BPR: the selection rule thresholds a probability, and BPR only
    orders pairs (its scores drift in scale as it trains); with one negative per positive the
    sigmoid estimates how much more a pair looks like an edge than a random pair. Why draw
    negatives that may be dropped edges: the predictor must not know the held-out edges, or
    step 3's figures would flatter it.
    """

    def __init__(self, settings: MendSettings) -> None:
        self.settings = settings
        self.user: torch.Tensor | None = None
        self.item: torch.Tensor | None = None
        self._cached: tuple[Interactions, torch.Tensor, torch.Tensor] | None = None

    def fit(self, kept: Interactions) -> None:
        cfg = self.settings
        generator = torch.Generator().manual_seed(int(counter_hash(cfg.seed, MEND_KEY) >> 1))
        user = torch.nn.Parameter(xavier_table(kept.num_users, cfg.dim, generator))
        item = torch.nn.Parameter(xavier_table(kept.num_items, cfg.dim, generator))
        optimizer = torch.optim.Adam([user, item], lr=cfg.lr)
        graph = BipartiteGraph(kept)
        known = np.unique(kept.users * kept.num_items + kept.items)
        # a user with an edge to every item has nothing to be contrasted with
        open_ = kept.user_degrees()[kept.users] < kept.num_items
        users, items = kept.users[open_], kept.items[open_]
        edge = np.flatnonzero(open_)
        for epoch in range(cfg.epochs if len(users) else 0):
            order = np.random.default_rng([cfg.seed, MEND_KEY, epoch]).permutation(len(users))
            for start in range(0, len(order), cfg.batch_size):
                pick = order[start:start + cfg.batch_size]
                u, i = users[pick], items[pick]
                j = sample_negatives(u, edge[pick], known, kept.num_items, cfg.seed,
                                     (MEND_KEY << 16) + epoch)
                users_g, items_g = graph.propagate(user, item, cfg.num_layers)
                ut = torch.from_numpy(u)
                pos = (users_g[ut] * items_g[torch.from_numpy(i)]).sum(1)
                neg = (users_g[ut] * items_g[torch.from_numpy(j)]).sum(1)
                reg = (sampled_rows_l2(user, ut)
                       + sampled_rows_l2(item, torch.from_numpy(np.concatenate([i, j]))))
                loss = F.softplus(-pos).mean() + F.softplus(neg).mean() \
                    + cfg.reg * reg / len(pick)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.user, self.item = user.detach(), item.detach()
        self._cached = None

    def probabilities(self, graph: Interactions, users: np.ndarray) -> np.ndarray:
        assert self.user is not None and self.item is not None, "fit first"
        if self._cached is None or self._cached[0] is not graph:
            with torch.no_grad():
                users_g, items_g = BipartiteGraph(graph).propagate(
                    self.user, self.item, self.settings.num_layers)
            self._cached = (graph, users_g, items_g)
        _, users_g, items_g = self._cached
        with torch.no_grad():
            return torch.sigmoid(users_g[torch.from_numpy(users)] @ items_g.T).numpy()


@dataclass(frozen=True)
class MendStats:
    """What the mending did (``summary.json``'s ``mending``).

    ``recovered``/``impaired_added``: the selection rule on the impaired graph (step 3);
    ``pair_accuracy``, ``recall`` and ``precision`` are ``None`` where nothing defines them;
    ``candidates``: pairs of U_s x I_s not in D_s; ``above_threshold``: those scored ``>=
    threshold`` on the full graph; ``added``: those added (at most ``cap``).
    """

    shared: int
    dropped: int
    recovered: int
    impaired_added: int
    pair_accuracy: float | None
    candidates: int
    above_threshold: int
    cap: int
    added: int
    seconds: float

    @property
    def recall(self) -> float | None:
        return self.recovered / self.dropped if self.dropped else None

    @property
    def precision(self) -> float | None:
        return self.recovered / self.impaired_added if self.impaired_added else None

    def to_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "recall": self.recall, "precision": self.precision}


@dataclass(frozen=True)
class Mending:
    """The mended graph's edges (D_s, then the added edges), the added and dropped edges (in
    D_s's id space) and the statistics."""

    edges: Interactions
    added: Interactions
    dropped: Interactions
    stats: MendStats


def impaired(shared: Interactions, drop: float, seed: int) -> np.ndarray:
    """Mask of the edges of ``shared`` dropped to impair it (step 1)."""
    n = len(shared)
    count = min(int(round(drop * n, 9) + 0.5), max(n - 1, 0))
    keys = shared.users * shared.num_items + shared.items
    rank = np.lexsort((keys, counter_uniform(seed, MEND_KEY, keys)))
    mask = np.zeros(n, dtype=bool)
    mask[rank[:count]] = True
    return mask


def _user_chunks(num_users: int, num_items: int) -> Iterator[np.ndarray]:
    step = max(1, SCORE_ELEMENTS // max(num_items, 1))
    for start in range(0, num_users, step):
        yield np.arange(start, min(start + step, num_users))


def select(predictor: LinkPredictor, graph: Interactions, threshold: float, cap: int
           ) -> tuple[np.ndarray, int]:
    """The selection rule (step 4) on ``graph``: keys ``user * I + item`` of the at most
    ``cap`` highest pairs not in ``graph`` with probability ``>= threshold`` (ties by key),
    and how many pairs reached the threshold."""
    known = np.unique(graph.users * graph.num_items + graph.items)
    best_keys, best_p = np.empty(0, np.int64), np.empty(0, np.float64)
    above = 0
    for users in _user_chunks(graph.num_users, graph.num_items):
        p = np.asarray(predictor.probabilities(graph, users), dtype=np.float64)
        keys = users[:, None] * graph.num_items + np.arange(graph.num_items)[None, :]
        mask = (p >= threshold) & ~np.isin(keys, known)
        above += int(mask.sum())
        best_keys = np.concatenate([best_keys, keys[mask]])
        best_p = np.concatenate([best_p, p[mask]])
        order = np.lexsort((best_keys, -best_p))[:cap]
        best_keys, best_p = best_keys[order], best_p[order]
    return np.sort(best_keys), above


def pair_accuracy(predictor: LinkPredictor, graph: Interactions, dropped: Interactions,
                  shared: Interactions, seed: int) -> float | None:
    """Share of ``dropped`` edges scored above one pair of the same user not in ``shared``
    (scores over ``graph``); users with an edge to every item are left out."""
    full = shared.user_degrees()[dropped.users] >= shared.num_items
    users, items = dropped.users[~full], dropped.items[~full]
    if not len(users):
        return None
    known = np.unique(shared.users * shared.num_items + shared.items)
    negatives = sample_negatives(users, np.arange(len(users)), known, shared.num_items, seed,
                                 MEND_KEY << 16)
    wins = 0
    for chunk in _user_chunks(graph.num_users, graph.num_items):
        here = (users >= chunk[0]) & (users <= chunk[-1])
        if here.any():
            p = predictor.probabilities(graph, chunk)
            row = users[here] - chunk[0]
            wins += int((p[row, items[here]] > p[row, negatives[here]]).sum())
    return wins / len(users)


def mend(shared: Interactions, settings: MendSettings,
         predictor: LinkPredictor | None = None) -> Mending:
    """Steps 1-4 on D_s (any order, no duplicates); ``predictor``: a
    :class:`LightGCNLinkPredictor` by default."""
    started = time.perf_counter()
    users_s, items_s = np.unique(shared.users), np.unique(shared.items)
    # the compact graph: users index U_s, items index I_s (the candidates' space)
    compact = Interactions.from_arrays(np.searchsorted(users_s, shared.users),
                                       np.searchsorted(items_s, shared.items),
                                       len(users_s), len(items_s))
    dropped_mask = impaired(shared, settings.drop, settings.seed)
    kept, dropped = compact.subset(~dropped_mask), compact.subset(dropped_mask)
    predictor = predictor or LightGCNLinkPredictor(settings)
    predictor.fit(kept)
    back, _ = select(predictor, kept, settings.threshold,
                     int(settings.ratio * len(kept) + 1e-9))
    recovered = int(np.isin(dropped.users * compact.num_items + dropped.items, back).sum())
    accuracy = pair_accuracy(predictor, kept, dropped, compact, settings.seed)
    cap = int(settings.ratio * len(shared) + 1e-9)
    added_keys, above = select(predictor, compact, settings.threshold, cap)
    added_users = users_s[added_keys // compact.num_items]
    added_items = items_s[added_keys % compact.num_items]
    order = np.lexsort((added_items, added_users))
    added = Interactions.from_arrays(added_users[order], added_items[order], shared.num_users,
                                     shared.num_items)
    stats = MendStats(len(shared), int(dropped_mask.sum()), recovered, len(back), accuracy,
                      len(users_s) * len(items_s) - len(shared), above, cap, len(added),
                      time.perf_counter() - started)
    edges = Interactions.from_arrays(np.concatenate([shared.users, added.users]),
                                     np.concatenate([shared.items, added.items]),
                                     shared.num_users, shared.num_items)
    return Mending(edges, added, shared.subset(dropped_mask), stats)
