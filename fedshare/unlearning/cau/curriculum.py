"""Sample scheduling from difficulty scores (Sec. 4.3.2): easy (low score) to hard.

Hard sampling (Algorithm 1): each epoch, stable-sort D_f ascending by difficulty and cut batches
of B in that order (ties keep the data order, so the schedule is deterministic).
Soft sampling (Algorithm 2, Eq. 13): at step k of T (Algorithm 2 counts k = 1..T), s = k/T and
p_x = exp((2s-1)(Dif_x - mean Dif))^tau / sum_j (...) = softmax(tau (2s-1)(Dif - mean Dif)),
tau = 2 (paper Sec. 5.1.4): easy samples are favoured while s < 1/2, hard ones after, uniform at
s = 1/2. A batch is B draws without replacement from p. Optional z-scoring of Dif first (the
embedding difficulty's scale is a logit's, which would make the softmax nearly one-hot).
T = E * ceil(|D_f| / B) so soft and hard sampling run the same number of steps (spec).
"Random" (the "w/o CU" ablation) shuffles D_f each epoch.
"""

from __future__ import annotations

import math

import numpy as np


def easy_to_hard(difficulty: np.ndarray) -> np.ndarray:
    """Indices sorted by ascending difficulty, stable."""
    return np.argsort(np.asarray(difficulty, dtype=np.float64), kind="stable")


def hard_batches(difficulty: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Algorithm 1, lines 4-5: one epoch's batches, in easy-to-hard order."""
    order = easy_to_hard(difficulty)
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The "w/o CU" ablation: one epoch's batches in a random order."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """ceil(|D_f| / B): also the soft schedule's rescoring period."""
    return max(1, math.ceil(n / batch_size))


def soft_probabilities(
    difficulty: np.ndarray, step: int, total_steps: int, tau: float = 2.0, zscore: bool = False
) -> np.ndarray:
    """Eq. 13: the sampling distribution over D_f at ``step`` of ``total_steps``."""
    d = np.asarray(difficulty, dtype=np.float64)
    c = d - d.mean()
    if zscore:
        sd = d.std()
        c = c / sd if sd > 0 else np.zeros_like(c)
    s = step / total_steps
    z = tau * (2.0 * s - 1.0) * c
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


def soft_batch(p: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Algorithm 2, line 8: min(B, |D_f|) distinct samples drawn according to ``p``."""
    k = min(batch_size, int(np.count_nonzero(p > 0)))
    return rng.choice(p.size, size=k, replace=False, p=p)
