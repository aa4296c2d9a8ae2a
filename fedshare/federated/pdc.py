"""PDC-FRS (Yang et al., ADMA 2024): users share interactions under local differential privacy.

No public code exists; this is built from ``shared/specs/baselines.md`` (two sentences) and the
FedShare paper's description (Sec. II-A, V-B). What follows is our interpretation.

**The mechanism, on the device.** Each shared interaction (u, i) is replaced, before it leaves
the device, by (u, j) with j drawn by the exponential mechanism::

    P(j | i) = exp(eps * sim(i, j) / (2 Delta)) / sum_{k in C_u} exp(eps * sim(i, k) / (2 Delta))

over the candidates C_u = the catalogue minus the user's whole training history (local and
shared items) and minus the items already drawn for the user's earlier shared items (the user's
shared items are perturbed in ascending item order). So the server never receives any of the
user's real training interactions, shared or local, and a user never uploads one pair twice
(the server's share check refuses duplicates). Draws use one uniform per (run seed, user, item)
from a counter-based stream (:func:`fedshare.sampling.counter_uniform`, key :data:`PDC_KEY`):
a user perturbs identically whichever node or cohort serves it, in either engine.

**The similarity: closeness in the public catalogue order,**
``sim(i, j) = 1 - ln(1 + |i - j|) / ln(n)`` for ``n`` catalogue items, so sim lies in [0, 1]
and the sensitivity is ``Delta = 1`` (the range of sim). Why this one:

- it is public: item ids are the publisher's ids in sorted order (``fedshare.data.preprocess``),
  which every device knows with the catalogue; no other user's data enter it. Item popularity
  or co-occurrence would be computed from other users' interactions, and a popularity the
  server published would have to come from data it does not have before the share round
  (its D_s is what is being perturbed);
- it exists for every dataset, unlike item attributes (ML-100K's genres are not part of a
  prepared plan or a device file, Amazon's catalogue has none);
- it carries some signal where ids follow the order titles entered the catalogue: on ML-100K's
  training split, item pairs at most 4 ids apart are rated together 10.8 times on average
  against 2.3 times for pairs over 600 apart (popularity falls with the id, correlation -0.63;
  a check made once, offline: devices use nothing of it); on Amazon's ASIN order it carries
  none, and the mechanism then only hides;
- the logarithm makes it scale-free (no bandwidth to tune) and puts the mass on near neighbours
  faster than a linear distance as eps grows (that co-occurrence falls roughly linearly in
  ``ln |i - j|`` too). Over a large catalogue any Delta = 1 utility leaves small eps nearly
  uniform: on ML-100K (1,682 items) 1.3% of the reports lie within 10 ids of the real item at
  eps = 1 (1.0% at eps = 0.1, uniform: 1.2%), 13% at eps = 10 and 99% at eps = 100.

**The guarantee.** For a fixed candidate set, any two input items i, i' give any output j
probabilities within a factor ``exp(eps)`` (the exponential mechanism: the utility's
sensitivity ``max_j |sim(i, j) - sim(i', j)|`` is at most Delta = 1): each shared item is
eps-LDP, and a user sharing k items spends k * eps by (adaptive) basic composition
(:func:`user_epsilon`); the default eps = 1 is the usual strong-privacy setting per item (the
odds between any two real items move at most e-fold), ``fedshare pdc-sweep`` measures others.
What the exclusion adds, and the plain mechanism would not reveal: the output is an item the
user has not interacted with (negative information about one item per shared interaction).
Draws come from a stream keyed by the run seed, as the other device-side defences'
(:mod:`fedshare.defences`): reproducible in simulation; a deployment whose server knows the
seed should key it with a device secret.

**The auxiliary model, on the server** (:mod:`fedshare.federated.server`): LightGCN (L layers)
trained with cosine BPR on the graph of the perturbed D_s, i.e. ``wo-cl``'s refinement
(FedShare's without its InfoNCE alignment): every round it starts from the aggregated table and
takes the configured Adam steps, its user rows and Adam state carrying on across rounds. Its
step enters the global table with the weight ``pdc-weight``::

    V_s = agg + weight * (refined - agg)

which is how it "adds global collaborative signal to the federated model". **The augmentation,
on the device** (:meth:`fedshare.federated.population.ClientPopulation.train`): before local
training a sampled user adds the ``augment`` items the received table (which carries the
auxiliary model's step) scores highest for it (cosine with its ego-graph vector over its whole
history, the ranking of :meth:`~fedshare.federated.population.ClientPopulation.scorer`; held
items excluded) as extra positives: "it augments each user's local data". The FedAvg weight
stays |I_local|. Both readings are ours: the spec gives two sentences, and a second table or
per-user item lists on the wire would change the protocol every other variant uses.

**Why the weight is 0.01 and augment 5** (chosen on ML-100K validation, eps = 1, 100 rounds):
the perturbed reports carry next to no signal, and the full step (weight 1, ``wo-cl``'s) trains
the table towards them: validation HR@20 0.35 against 0.58 without server training (seed 0),
and still 0.41 at eps = 10^4, where every report is an id-neighbour of the real item (a
different title). Over seeds 0-2, weight 0 / 0.01 / 0.03 gave validation HR@20 0.582 / 0.580 /
0.579 and NDCG@20 0.119 / 0.115 / 0.112, and weights 0.1 and 0.3 lost 0.07 and 0.15 HR on seed
0; 0 switches the auxiliary model off, so the smallest weight tried that keeps it is the
default (``pdc-weight=1`` gives the unweighted reading). At weight 0.03 over seeds 0-2,
augment 0 / 5 / 20 gave validation HR@20 0.571 / 0.579 / 0.571 and NDCG@20 0.113 / 0.112 /
0.099.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedshare.errors import FedShareError
from fedshare.sampling import counter_uniform

PDC_KEY = 0x9DC
"""Stream key of the devices' PDC-FRS draws (one uniform per run seed, user and shared item)."""
SENSITIVITY = 1.0
"""Delta: the range of :func:`similarity` (it lies in [0, 1])."""


@dataclass(frozen=True)
class PdcSettings:
    """The PDC-FRS settings of a run (run-config keys ``pdc-epsilon``, ``pdc-augment``,
    ``pdc-weight``).

    Args:
        epsilon: the exponential mechanism's epsilon per shared item.
        augment: extra positives a sampled user adds to its local training each round.
        weight: the share of the auxiliary model's step that enters the global table,
            ``V_s = agg + weight * (refined - agg)``.
    """

    epsilon: float = 1.0
    augment: int = 5
    weight: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float) or not (
                math.isfinite(self.epsilon) and self.epsilon > 0):
            raise FedShareError(f"pdc-epsilon must be a positive number, got {self.epsilon!r}")
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) \
                or self.augment < 0:
            raise FedShareError(f"pdc-augment must be a whole number >= 0, got "
                                f"{self.augment!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) \
                or not 0.0 <= self.weight <= 1.0:
            raise FedShareError(f"pdc-weight must be a number in [0, 1], got {self.weight!r}")


def similarity(item: int | np.ndarray, candidates: np.ndarray, num_items: int) -> np.ndarray:
    """``sim(item, j) = 1 - ln(1 + |item - j|) / ln(num_items)`` for every ``j`` of
    ``candidates`` (``item`` broadcast against them): closeness in the public catalogue order,
    in [0, 1]."""
    distance = np.abs(np.asarray(candidates, np.int64) - np.asarray(item, np.int64))
    return 1.0 - np.log1p(distance) / math.log(max(num_items, 2))


def probabilities(item: int, excluded: np.ndarray, num_items: int, epsilon: float
                  ) -> np.ndarray:
    """``P(j | item)`` of the mechanism for every catalogue item (0 on ``excluded``): the
    formula the sampler draws from and the tests check frequencies against."""
    mask = np.ones(num_items, bool)
    mask[np.asarray(excluded, np.int64)] = False
    if not mask.any():
        raise FedShareError("no candidate item left to report: the user holds the whole "
                            "catalogue")
    score = similarity(item, np.arange(num_items), num_items)
    logits = epsilon * score / (2 * SENSITIVITY)
    weights = np.where(mask, np.exp(logits - logits[mask].max()), 0.0)
    return weights / weights.sum()


def perturb_user(user: int, shared: np.ndarray, held: np.ndarray, num_items: int,
                 epsilon: float, seed: int, secret: int = 0) -> np.ndarray:
    """The items one user reports for its ``shared`` items (aligned with them).

    Shared items are perturbed in ascending order; each draw's candidates exclude ``held``
    (the user's whole training history) and the earlier draws. One uniform per (seed, user,
    item) picks the output by inverting the cumulative distribution over the candidates.
    """
    shared = np.asarray(shared, np.int64)
    excluded = np.zeros(num_items, bool)
    excluded[np.asarray(held, np.int64)] = True
    excluded[shared] = True  # shared items are held too; the caller need not repeat them
    out = np.empty(len(shared), np.int64)
    # the log-weight eps * sim / (2 Delta) of each catalogue distance, up to a constant
    by_distance = -epsilon / (2 * SENSITIVITY) * np.log1p(np.arange(num_items)) \
        / math.log(max(num_items, 2))
    # a deployed device's secret joins the keys (the server knows the seed: without the secret
    # it could recompute the uniforms and invert the draws); secret 0 keeps the seed's stream
    uniforms = counter_uniform(PDC_KEY, seed, user, shared, *((secret,) if secret else ()))
    for k in np.argsort(shared, kind="stable"):
        candidates = np.flatnonzero(~excluded)
        if len(candidates) == 0:
            raise FedShareError(f"user {user} holds the whole catalogue: no item left to "
                                "report in place of a shared one")
        logits = by_distance[np.abs(candidates - shared[k])]
        cdf = np.cumsum(np.exp(logits - logits.max()))  # the nearest candidate weighs 1
        pick = min(int(np.searchsorted(cdf, uniforms[k] * cdf[-1], side="right")),
                   len(candidates) - 1)
        out[k] = candidates[pick]
        excluded[out[k]] = True
    return out


def perturb_shared(users: np.ndarray, items: np.ndarray, held_ptr: np.ndarray,
                   held_items: np.ndarray, num_items: int, epsilon: float, seed: int,
                   secret: int = 0) -> np.ndarray:
    """The reported item of every shared pair ``(users[k], items[k])`` (aligned with them);
    user ``u`` holds ``held_items[held_ptr[u]:held_ptr[u + 1]]``."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    out = np.empty(len(items), np.int64)
    order = np.argsort(users, kind="stable")
    for mine in np.split(order, np.flatnonzero(np.diff(users[order])) + 1):
        if len(mine) == 0:
            continue
        user = users[mine[0]]
        held = held_items[held_ptr[user]:held_ptr[user + 1]]
        out[mine] = perturb_user(int(user), items[mine], held, num_items, epsilon, seed,
                                 secret)
    return out


def user_epsilon(epsilon: float, shared_count: int) -> float:
    """A user's total budget for ``shared_count`` perturbed items (basic composition)."""
    return epsilon * shared_count
