"""The client side of the learning phase for a group of users (a cohort, or one user).

A node serves some users: it holds all of their training interactions (sharing uploads a copy,
Sec. III-B), trains each on its I_local only (shared data are trained by the server, Sec. IV-B2),
keeps their user embeddings private and replies with the FedAvg mean of their item tables and the
summed weights, so that averaging node replies gives exactly Eq. 16 over the users.

Choices: a user's weight |D_u| is the number of interactions its update was computed from,
|I_local(u)| (FedAvg's n_k); a full sharer has nothing local, weighs 0 and is not sampled for
training, though it is still evaluated. For ranking, a user's vector is the one-layer ego-graph
LightGCN over the user's *whole* training history (local and shared: the client holds both), and
items are scored by cosine, the similarity the client is trained with (Eq. 15).

The user embedding e_u in that vector: a user with local data uses the one the learning rounds
trained on its I_local. A user with nothing local but a held history (a full sharer: the device
keeps a copy of what it shared, Sec. III-B) is never trained by the rounds, so its e_u would stay
the random initialisation; instead the device fits it (:meth:`ClientPopulation.fitted_embeddings`)
with the very local training every client runs (:func:`train_local`: cosine BPR, the run's
epochs and learning rate, uniform negatives) on its whole held history against the received
table, from its initial embedding and on a fixed negative stream (the run seed, round key
:data:`FIT_ROUND`). Only e_u is kept and nothing is uploaded: the item rows it trains are
discarded, since the server trains the shared data. The fit is a pure function of (table,
history), recomputed whenever ranking vectors are needed, so it adds no client state (a resumed
run, the Flower ClientApp and the in-process engine all get the same vector, whichever node or
cohort serves the user), and a user who then holds no data at all (it unshared everything) is a
cold-start user ranked with its initial e_u.

PDC-FRS (``pdc``, :mod:`fedshare.federated.pdc`): what sharing uploads is perturbed on the node
(:meth:`ClientPopulation.shared_interactions`), so the real shared items never leave it, and a
sampled user trains on its I_local plus the items the received table ranks highest for it
(:meth:`ClientPopulation.augmented`), still weighing |I_local|.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.defences import UploadDefence, defend_upload, device_generator
from fedshare.federated.pdc import PdcSettings, perturb_shared
from fedshare.metrics import Scorer, topk_sums
from fedshare.models.local import (
    LocalTrainConfig,
    LocalUpdate,
    UserBatch,
    train_local,
    user_representation,
)
from fedshare.sampling import counter_uniform

TRAIN_CHUNK = 512
"""Users trained and averaged per call of the trainer: a cohort's memory stays that of 512
users (every trained row of every user is held until it is averaged)."""

FIT_ROUND = -1
"""Round key of the negative-sampling stream of the on-device fit of users with nothing local
(:meth:`ClientPopulation.fitted_embeddings`): no learning or unlearning round is negative, so
the fit draws its own negatives, the same at every evaluation and in every cohort."""


def initial_user_embeddings(users: np.ndarray, num_users: int, dim: int, seed: int) -> Tensor:
    """Xavier-uniform rows for ``users`` of a ``[num_users, dim]`` table, drawn per user from
    a counter-based stream so a user starts the same in any cohort."""
    bound = (6.0 / (num_users + dim)) ** 0.5
    u = counter_uniform(seed, 0x5EED, np.asarray(users, np.int64)[:, None], np.arange(dim))
    return torch.from_numpy(((u * 2 - 1) * bound).astype(np.float32))


@dataclass
class NodeUpdate:
    """One node's reply to a train message.

    ``table`` is the weighted mean of its users' uploaded tables (the start table if the weight
    is 0); ``weight`` the sum of their |D_u|; ``row_weight[i]`` the weight of the users whose
    update touched row ``i`` (for row-wise averaging); ``num_users`` how many trained.
    """

    table: Tensor
    weight: float
    row_weight: Tensor
    num_users: int


class ClientPopulation:
    """Data and private state of the users one node serves.

    Args:
        data: the prepared split and sharing plan.
        users: the global ids this node serves.
        dim, seed: embedding size; seed of the private user embeddings (and of the fit's
            negatives).
        shares: ``False`` keeps every training interaction local (the no-sharing baseline).
        local: the run's local training, with which users with nothing local fit their user
            embedding for ranking (see the module docstring).
        pdc: PDC-FRS's settings (variant ``pdc-frs``): shared items are perturbed before they
            are uploaded and training adds augmented positives; ``None`` otherwise.
        secret: the device's secret, mixed into every draw the server must not recompute
            (PDC-FRS's reports, decoys, LDP noise; :mod:`fedshare.defences`); 0 in
            simulations.
    """

    def __init__(self, data: PreparedData, users: np.ndarray, dim: int, seed: int,
                 shares: bool = True, local: LocalTrainConfig | None = None,
                 pdc: PdcSettings | None = None, secret: int = 0) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.secret = secret
        self.dim, self.seed = dim, seed
        self.local = LocalTrainConfig() if local is None else local
        self.num_users = data.num_users
        self.num_items = data.num_items
        train = data.split.train
        local = data.plan.local(train) if shares else train
        shared = data.plan.shared_data(train) if shares else train.subset(np.zeros(len(train),
                                                                                     bool))
        mine = np.isin(shared.users, self.users)
        self._shared_users, self._shared_items = shared.users[mine], shared.items[mine]
        self._local_ptr, self._local_items = local.items_by_user()
        self._all_ptr, self._all_items = train.items_by_user()
        self.valid, self.test = data.split.valid, data.split.test
        self.train_data = train
        self.embeddings = initial_user_embeddings(self.users, self.num_users, dim, seed)
        self._row = {int(u): k for k, u in enumerate(self.users)}
        self.pdc = pdc
        self._reported: np.ndarray | None = None

    def shared_interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) pairs of the served users' I_share: what sharing uploads (Eq. 7).

        With PDC-FRS each item is the exponential mechanism's report in place of the shared
        one (:func:`fedshare.federated.pdc.perturb_shared`, drawn once per population)."""
        if self.pdc is None:
            return self._shared_users.copy(), self._shared_items.copy()
        if self._reported is None:
            self._reported = perturb_shared(self._shared_users, self._shared_items,
                                            self._all_ptr, self._all_items, self.num_items,
                                            self.pdc.epsilon, self.seed, self.secret)
        return self._shared_users.copy(), self._reported.copy()

    def sharers(self) -> np.ndarray:
        """The served users who share something (without drawing PDC-FRS's reports)."""
        return np.unique(self._shared_users)

    def local_count(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        return self._local_ptr[users + 1] - self._local_ptr[users]

    def trainable(self) -> np.ndarray:
        """Users with local interactions to train on."""
        return self.users[self.local_count(self.users) > 0]

    def _rows(self, users: np.ndarray) -> np.ndarray:
        try:
            return np.array([self._row[int(u)] for u in users], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"user {exc.args[0]} is not served by this node") from None

    def _items(self, ptr: np.ndarray, items: np.ndarray, u: int) -> np.ndarray:
        return items[ptr[u]:ptr[u + 1]]

    def user_items(self, users: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per user: the items its local training trains on (I_local) and its whole training
        history (local and shared)."""
        users = np.asarray(users, dtype=np.int64)
        return ([self._items(self._local_ptr, self._local_items, u) for u in users],
                [self._items(self._all_ptr, self._all_items, u) for u in users])

    def train(self, users: np.ndarray, table: Tensor, config: LocalTrainConfig, seed: int,
              round_: int, observe: Callable[[LocalUpdate, Tensor], None] | None = None,
              defence: UploadDefence | None = None) -> NodeUpdate:
        """Train ``users`` from the global ``table`` (Eq. 12-15) and aggregate their uploads.

        ``observe(update, weights)`` sees the per-user rows before they are averaged (the
        client-side stores of unlearning baselines). ``defence`` rewrites each user's upload
        before it is averaged (:func:`fedshare.defences.defend_upload`: non-marking or LDP
        uploads; the other defences do not change what a user uploads).
        """
        users = np.asarray(users, dtype=np.int64)
        users = users[self.local_count(users) > 0]
        if len(users) == 0:
            return NodeUpdate(table.clone(), 0.0, torch.zeros(self.num_items), 0)
        weighted, row_weight, total = torch.zeros_like(table), torch.zeros(self.num_items), 0.0
        for lo in range(0, len(users), TRAIN_CHUNK):  # users are independent: any grouping
            part = users[lo:lo + TRAIN_CHUNK]
            rows = self._rows(part)
            positives = [self._items(self._local_ptr, self._local_items, u) for u in part]
            known = [self._items(self._all_ptr, self._all_items, u) for u in part]
            if self.pdc is not None and self.pdc.augment > 0:
                extra = self.augmented(part, table, self.pdc.augment)
                positives = [np.concatenate([p, e]) for p, e in zip(positives, extra,
                                                                   strict=True)]
                known = [np.concatenate([k, e]) for k, e in zip(known, extra, strict=True)]
            batch = UserBatch.from_lists(part, positives, known, self.num_items)
            update = train_local(batch, table, self.embeddings[rows], config, seed, round_)
            self.embeddings[rows] = update.user_embeddings
            weights = torch.from_numpy(self.local_count(part)).float()  # |I_local|
            if observe is not None:
                observe(update, weights)
            if defence is not None and defence.rewrites_rows:
                weighted += table * weights.sum() + self._defended(
                    update, table, weights, defence, seed, round_, row_weight)
            else:
                weighted += update.weighted_sum(table, weights)
                row_weight.index_add_(0, update.row_item, weights[update.row_user])
            total += float(weights.sum())
        return NodeUpdate(weighted / total, total, row_weight, len(users))

    def augmented(self, users: np.ndarray, table: Tensor, k: int) -> list[np.ndarray]:
        """PDC-FRS's augmentation: per user, the ``k`` items it does not hold that ``table``
        ranks highest for it (its ranking: cosine with its ego-graph vector over its whole
        history), best first.

        Scores are float64 and ties go to the lower item id, so a user gets the same items
        alone or in any cohort."""
        users = np.asarray(users, dtype=np.int64)
        vectors = F.normalize(self.user_vectors(users, table).double(), dim=-1)
        scores = (vectors @ F.normalize(table.double(), dim=-1).T).numpy()
        extra = []
        for b, u in enumerate(users.tolist()):
            held = self._items(self._all_ptr, self._all_items, u)
            score = scores[b].copy()
            score[held] = -np.inf
            order = np.argsort(-score, kind="stable")[:min(k, self.num_items - len(held))]
            extra.append(order.astype(np.int64))
        return extra

    def _defended(self, update: LocalUpdate, table: Tensor, weights: Tensor,
                  defence: UploadDefence, seed: int, round_: int, row_weight: Tensor) -> Tensor:
        """``sum_u w_u delta_u`` of the defended uploads (adding their row weights to
        ``row_weight``), one user at a time on the user's own device stream."""
        total = torch.zeros_like(table)
        for b, user in enumerate(update.users.tolist()):
            mine = update.row_user == b
            items = update.row_item[mine]
            deltas = update.row_value[mine].to(table.dtype) - table[items]
            rows, values = defend_upload(items, deltas, self.num_items, defence,
                                         device_generator(seed, round_, int(user),
                                                          self.secret))
            total.index_add_(0, rows, weights[b] * values)
            row_weight.index_add_(0, rows, weights[b].expand(len(rows)))
        return total

    def held_count(self, users: np.ndarray) -> np.ndarray:
        """Training interactions each user holds (local and shared)."""
        users = np.asarray(users, dtype=np.int64)
        return self._all_ptr[users + 1] - self._all_ptr[users]

    def fitted_embeddings(self, users: np.ndarray, table: Tensor) -> Tensor:
        """User embeddings fitted on the device for ranking (users with nothing local).

        Each user of ``users`` trains as any client does (:func:`train_local`, the run's
        :attr:`local` config) on its whole held history against ``table``, from its initial
        embedding and on the negative stream ``(seed, FIT_ROUND)``; the trained item rows are
        dropped. A pure function of (table, history): no state is read or written.
        """
        users = np.asarray(users, dtype=np.int64)
        start = initial_user_embeddings(users, self.num_users, self.dim, self.seed)
        fitted = [start[:0].to(table.dtype)]
        for lo in range(0, len(users), TRAIN_CHUNK):  # users are independent: any grouping
            part = users[lo:lo + TRAIN_CHUNK]
            held = [self._items(self._all_ptr, self._all_items, u) for u in part]
            batch = UserBatch.from_lists(part, held, held, self.num_items)
            update = train_local(batch, table, start[lo:lo + TRAIN_CHUNK], self.local,
                                 self.seed, FIT_ROUND)
            fitted.append(update.user_embeddings)
        return torch.cat(fitted)

    def ranking_embeddings(self, users: np.ndarray, table: Tensor) -> Tensor:
        """e_u of the ranking vectors: the trained embedding of a user with local data, the
        fitted one (:meth:`fitted_embeddings`) of a user holding only shared data, the initial
        one of a user holding nothing."""
        users = np.asarray(users, dtype=np.int64)
        embeddings = self.embeddings[self._rows(users)].to(table.dtype)
        fit = (self.local_count(users) == 0) & (self.held_count(users) > 0)
        if fit.any():
            embeddings[torch.from_numpy(fit)] = self.fitted_embeddings(users[fit], table)
        return embeddings

    def user_vectors(self, users: np.ndarray, table: Tensor) -> Tensor:
        """Ranking vectors: ego-graph LightGCN over each user's whole history (Eq. 13-14),
        with :meth:`ranking_embeddings` as e_u."""
        users = np.asarray(users, dtype=np.int64)
        sizes = self.held_count(users)
        indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]))
        items = torch.from_numpy(np.concatenate(
            [np.zeros(0, np.int64), *(self._items(self._all_ptr, self._all_items, u)
                                      for u in users)]))
        return user_representation(self.ranking_embeddings(users, table), table, indptr, items)

    def evaluate(self, users: np.ndarray, table: Tensor, part: str = "valid",
                 ks: tuple[int, ...] = (20,)) -> tuple[dict[str, float], int]:
        """Sums of HR/Recall/NDCG@K over ``users`` (client-side ranking of all items)."""
        users = np.asarray(users, dtype=np.int64)
        heldout: Interactions = self.valid if part == "valid" else self.test
        exclude = [self.train_data] if part == "valid" else [self.train_data, self.valid]
        return topk_sums(self.scorer(table, users), heldout, exclude, ks, users=users)

    def scorer(self, table: Tensor, users: np.ndarray | None = None) -> Scorer:
        """Client-side ranking scores (cosine, see module docstring) of served ``users``."""
        users = self.users if users is None else np.asarray(users, dtype=np.int64)
        items = F.normalize(table, dim=-1)
        vectors = F.normalize(self.user_vectors(users, table), dim=-1)
        position = torch.full((self.num_users,), -1, dtype=torch.long)
        position[torch.from_numpy(users)] = torch.arange(len(users))

        def score(chunk: Tensor) -> Tensor:
            return vectors[position[chunk]] @ items.T

        return score
