"""What an FRU participant stores each round it trains: FRU's settings and row selection.

Kept free of the server's code (PyG, the in-process engine): a ClientApp calls
:func:`stored_rows` with only what its node holds: the local update of its users, the table it
received, each user's positives (the items its local training trained on) and whole training
history, and the seed and round that key the run's random streams.

FRU (Yuan et al., WSDM 2023; ``shared/specs/baselines.md``) stores, per round a user trains,
``ceil(alpha * (|pos| + beta * |neg|))`` item-update rows with |neg| = |pos|: its positives and
``ceil(beta * |pos|)`` negatives from the user-item mixed semi-hard pool, of which the top-alpha
fraction by L2 norm of ``v_i(after) - v_i(received)`` is kept.

Interpretation: the learning phase is shared by every method (one learned model, the same for
all of them), so its local training keeps its own uniform negatives (``num_negatives`` per
positive and epoch). FRU's sampling here decides which rows are *stored*, not how the model was
trained: the negatives are drawn from the semi-hard pool *restricted to the negatives this
round's local training moved* (a row that did not move has no update to store).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from fedshare.errors import FedShareError
from fedshare.models.local import LocalUpdate
from fedshare.sampling import counter_hash

SAMPLINGS = ("paper", "learning")
NEGATIVE_STREAM = 0xF2B
"""Key of FRU's negative draws in the counter-based stream (:mod:`fedshare.sampling`)."""


@dataclass(frozen=True)
class FruSettings:
    """FRU's storage settings (defaults: the paper's, except ``pool``).

    Args:
        alpha: importance selection: the fraction of the candidate rows kept per round, by L2
            norm of the update row (paper: 0.5).
        beta: negatives per positive among the candidates: ``ceil(beta * |pos|)`` (paper: 0.5).
        pool: R, the fraction of the user's non-interacted items in each half of the
            user-item mixed semi-hard pool (those closest, in Euclidean distance, to the user
            embedding, union those closest to the mean of its positive item embeddings).
            FRU's paper gives no value we have: 0.1 (10% of the catalogue per half, 168 items
            of ML-100K) is our choice, narrow enough to be "semi-hard", wide enough that the
            moved negatives of a round (5 epochs x |pos| uniform draws) meet it.
        sampling: ``"paper"`` (the candidates above) or ``"learning"`` (every row the local
            training touched: all positives and every negative of every local epoch, the
            learning phase's own sampling; kept for the side-by-side storage figure).
    """

    alpha: float = 0.5
    beta: float = 0.5
    pool: float = 0.1
    sampling: str = "paper"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0.0 < value <= 1.0:
                raise FedShareError(f"FRU's {name} must be a number in (0, 1], got {value!r}")
        if self.sampling not in SAMPLINGS:
            raise FedShareError(f"FRU's sampling must be one of {', '.join(SAMPLINGS)}, got "
                                f"{self.sampling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def id_dtype(num_items: int) -> torch.dtype:
    """The compact dtype of stored item ids: int16 up to 32767 items, else int32."""
    return torch.int16 if num_items <= 32767 else torch.int32


def id_bytes(num_items: int) -> int:
    return torch.empty(0, dtype=id_dtype(num_items)).element_size()


def kept_rows(alpha: float, touched: int) -> int:
    """ceil(alpha * touched), in exact decimal arithmetic (0.55 * 100 is 55, not 56)."""
    return math.ceil(Fraction(str(alpha)) * touched)


def row_bytes(rows: int, dim: int, num_items: int) -> int:
    """Stored rows: ``dim`` float32 values and a compact item id each (:func:`id_dtype`)."""
    return rows * (dim * 4 + id_bytes(num_items))


def select_important_rows(items: Tensor, deltas: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The top-``alpha`` fraction of update rows by L2 norm (ties broken by item id)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    keep = kept_rows(alpha, len(items))
    order = np.lexsort((items.numpy(), -deltas.norm(dim=1).numpy()))[:keep]
    chosen = torch.from_numpy(np.sort(order))
    return items[chosen], deltas[chosen]


def _closest(points: np.ndarray, candidates: np.ndarray, centre: np.ndarray,
             count: int) -> np.ndarray:
    distance = np.linalg.norm(points[candidates] - centre, axis=1)
    return candidates[np.lexsort((candidates, distance))[:count]]


def semi_hard_pool(table: Tensor, user_embedding: Tensor, positives: np.ndarray,
                   history: np.ndarray, fraction: float) -> np.ndarray:
    """FRU's user-item mixed semi-hard pool (sorted item ids): the ``ceil(fraction * n)`` of
    the user's ``n`` non-interacted items closest (Euclidean) to its embedding, union as many
    closest to the mean of its positives' embeddings (ties to the smaller id). Item embeddings
    are rows of ``table`` (the table the user received)."""
    points = table.detach().to(torch.float64).numpy()
    outside = np.setdiff1d(np.arange(len(points)), history)
    count = kept_rows(fraction, len(outside))
    if count == 0:
        return outside
    centre_user = user_embedding.detach().to(torch.float64).numpy()
    centre_items = points[np.asarray(positives, np.int64)].mean(axis=0)
    return np.union1d(_closest(points, outside, centre_user, count),
                      _closest(points, outside, centre_items, count))


def draw_negatives(available: np.ndarray, count: int, seed: int, round_: int,
                   user: int) -> np.ndarray:
    """``count`` of the ``available`` item ids uniformly without replacement (all if fewer),
    sorted, from the counter-based stream: the same draw in any engine and any cohort."""
    available = np.asarray(available, np.int64)
    if count >= len(available):
        return np.sort(available)
    keys = counter_hash(seed, NEGATIVE_STREAM, round_, user, available)
    return np.sort(available[np.lexsort((available, keys))[:count]])


def candidates(items: Tensor, deltas: Tensor, table: Tensor, user_embedding: Tensor,
               positives: np.ndarray, history: np.ndarray, settings: FruSettings, seed: int,
               round_: int, user: int) -> Tensor:
    """Positions (in ``items``) of one user's candidate rows under ``settings.sampling``."""
    if settings.sampling == "learning":
        return torch.arange(len(items))
    ids = items.numpy()
    moved = (deltas != 0).any(dim=1).numpy()
    positive = np.isin(ids, positives)
    pool = semi_hard_pool(table, user_embedding, positives, history, settings.pool)
    available = ids[moved & ~positive & np.isin(ids, pool)]
    negatives = draw_negatives(available, kept_rows(settings.beta, len(positives)), seed,
                               round_, user)
    return torch.from_numpy(np.flatnonzero((moved & positive) | np.isin(ids, negatives)))


def stored_rows(update: LocalUpdate, table: Tensor, positives: Sequence[np.ndarray],
                history: Sequence[np.ndarray], settings: FruSettings, seed: int, round_: int
                ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(user, item ids, update rows) that each trained user of ``update`` stores this round.

    Args:
        update: the local training of the node's users from ``table``.
        table: the item table they received (``[I, d]``); also the item embeddings of the
            semi-hard pool.
        positives: per batch position of ``update``, the items its training trained on.
        history: per batch position, the user's whole training history (local and shared):
            everything else is "non-interacted".
        settings: FRU's settings; ``update.user_embeddings`` (after training) centre the pool.
        seed, round_: keys of the negative draw.

    Item ids come as :func:`id_dtype` of the catalogue, rows as float32.
    """
    compact = id_dtype(table.shape[0])
    for b, user in enumerate(update.users.tolist()):
        mine = update.row_user == b
        if not bool(mine.any()):
            continue
        items = update.row_item[mine]
        deltas = update.row_value[mine] - table[items]
        chosen = candidates(items, deltas, table, update.user_embeddings[b],
                            np.asarray(positives[b], np.int64),
                            np.asarray(history[b], np.int64), settings, seed, round_, user)
        if len(chosen) == 0:
            continue
        kept_items, kept = select_important_rows(items[chosen], deltas[chosen], settings.alpha)
        yield user, kept_items.to(compact), kept.to(torch.float32)
