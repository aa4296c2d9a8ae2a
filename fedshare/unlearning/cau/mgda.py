"""Exact three-task MGDA weights (Eq. 10): min ||sum_i a_i g_i||^2 over the simplex.

With the Gram matrix M_ij = <g_i, g_j> the objective is a^T M a. The minimum lies in the
interior of the simplex or of one of its faces, so the exact solver checks every candidate and
keeps the best: the interior stationary point from the KKT system [2M 1; 1^T 0][a; mu] = [0; 1]
(used when feasible, a >= 0), each edge by the two-task closed form
gamma = clip((M_jj - M_ij) / (M_ii + M_jj - 2 M_ij), 0, 1) (0.5 when the denominator is ~0), and
the three vertices. Degenerate (singular, collinear, zero) Gram matrices are handled because the
KKT system is solved by least squares and the edges and vertices are always candidates.

Tasks whose gradient norm is below ``tol`` (the KL task at theta = theta_ref, see ``losses``) are
dropped from the solver for that step (weight 0): otherwise min-norm picks the zero gradient,
a = (0, 0, 1), and the update is zero forever.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

DROP_TOL = 1e-10


def gram(grads: Tensor, normalize: bool = False) -> np.ndarray:
    """Gram matrix of the flattened task gradients ``[k, P]`` (float64); optionally of the
    L2-normalised gradients (a zero gradient stays zero)."""
    g = grads.detach().to(torch.float64)
    if normalize:
        norms = g.norm(dim=1, keepdim=True)
        g = torch.where(norms > 0, g / norms.clamp_min(1e-300), g)
    return (g @ g.T).cpu().numpy()


def active_tasks(m: np.ndarray, tol: float = DROP_TOL) -> np.ndarray:
    """Tasks whose gradient norm sqrt(M_ii) is at least ``tol``."""
    return np.sqrt(np.clip(np.diag(m), 0.0, None)) >= tol


def two_task_gamma(m_ii: float, m_jj: float, m_ij: float) -> float:
    """Closed form of min_gamma ||gamma g_i + (1 - gamma) g_j||^2 on [0, 1]."""
    den = m_ii + m_jj - 2.0 * m_ij
    if den <= 1e-12 * max(m_ii + m_jj, 1e-300):
        return 0.5
    return float(np.clip((m_jj - m_ij) / den, 0.0, 1.0))


def _interior(m: np.ndarray) -> np.ndarray | None:
    """Stationary point of a^T M a on sum a = 1 via the KKT system; None if infeasible."""
    k = m.shape[0]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = 2.0 * m
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    sol, *_ = np.linalg.lstsq(kkt, rhs, rcond=None)
    a = sol[:k]
    scale = max(float(np.abs(m).max()), 1e-300)
    if np.abs(kkt @ sol - rhs).max() > 1e-8 * max(1.0, scale) or a.min() < -1e-12:
        return None
    a = np.clip(a, 0.0, None)
    return a / a.sum()


def _candidates(m: np.ndarray) -> list[np.ndarray]:
    k = m.shape[0]
    out = [np.eye(k)[i] for i in range(k)]
    for i, j in itertools.combinations(range(k), 2):
        g = two_task_gamma(m[i, i], m[j, j], m[i, j])
        a = np.zeros(k)
        a[i], a[j] = g, 1.0 - g
        out.append(a)
    if k >= 3:
        a = _interior(m)
        if a is not None:
            out.append(a)
    return out


def min_norm_weights(
    m: np.ndarray, active: np.ndarray | None = None, tol: float = DROP_TOL
) -> np.ndarray:
    """Eq. 10: the simplex weights minimising a^T M a over the active tasks (others get 0).

    ``active`` defaults to :func:`active_tasks` (drop gradients with norm < ``tol``). If no task
    is active every gradient is zero and the weights are uniform (the update is zero anyway).
    """
    m = np.asarray(m, dtype=np.float64)
    k = m.shape[0]
    act = active_tasks(m, tol) if active is None else np.asarray(active, dtype=bool)
    idx = np.flatnonzero(act)
    if idx.size == 0:
        return np.full(k, 1.0 / k)
    sub = m[np.ix_(idx, idx)]
    best, best_val = None, np.inf
    for a in _candidates(sub):
        val = float(a @ sub @ a)
        if val < best_val:
            best, best_val = a, val
    out = np.zeros(k)
    out[idx] = best
    return out


def combine(grads: Tensor, weights: np.ndarray) -> Tensor:
    """d = sum_i a_i g_i (the update direction of Eq. 8)."""
    a = torch.as_tensor(weights, dtype=grads.dtype, device=grads.device)
    return a @ grads
