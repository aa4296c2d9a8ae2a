"""Compiled (numba) cosine losses of the server's steps, each with its gradient.

Why compiled: on ML-100K the server's batch BPR (Eq. 18's BPR term, cosine scores as Eq. 15) and
L_CU (Eq. 25) are a few hundred thousand multiply-adds, but written as tensor operations they
are some 60 small operations and their backward passes, several times the cost of the LightGCN
propagation they follow. One loop per pair or item computes the loss and its gradient with
respect to the *unnormalised* rows in one pass. :class:`KernelLoss` hands the gradient to
autograd, so the propagation before it still backpropagates as usual. Tests compare value and
gradient with the autograd forms (:func:`fedshare.losses.bpr_loss` on
``F.cosine_similarity``, :func:`fedshare.unlearning.contrastive.contrastive_unlearning_loss`).

The cosine gradient is ``d cos(a, b) / da = (b^ - cos(a, b) a^) / |a|`` with norms clamped at
1e-12 like ``F.normalize``. Row sums may be reassociated (vectorised), unlike the client
kernel's: the client kernel must give a user the same floats wherever its rows lie in memory
(alone or in a cohort), while these losses only need the same floats for the same inputs, which
one compiled loop over one ordering of the batch always gives. The gradient rows they write are
float32 arrays of their own, never the rows they read.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

_TINY = 1e-12
_FAST = {"reassoc", "nnan", "ninf", "nsz", "arcp", "afn"}
"""fastmath without ``contract``: reassociated (vectorised) sums; see the module docstring."""


@njit(cache=True, nogil=True, fastmath=_FAST)
def cosine_bpr(users: np.ndarray, items: np.ndarray, u: np.ndarray, i: np.ndarray,
               j: np.ndarray, grad_users: np.ndarray, grad_items: np.ndarray) -> float:
    """Mean over pairs ``k`` of ``-ln sigma(cos(users[u_k], items[i_k]) - cos(users[u_k],
    items[j_k]))``; adds its gradient to ``grad_users`` and ``grad_items`` (zeros)."""
    n, d = len(u), users.shape[1]
    inv_n = 1.0 / max(n, 1)
    total = 0.0
    for k in range(n):
        a, p, q = users[u[k]], items[i[k]], items[j[k]]
        aa = pp = qq = ap = aq = np.float32(0)
        for c in range(d):
            aa += a[c] * a[c]
            pp += p[c] * p[c]
            qq += q[c] * q[c]
            ap += a[c] * p[c]
            aq += a[c] * q[c]
        ia = 1.0 / max(np.sqrt(aa), _TINY)
        ip = 1.0 / max(np.sqrt(pp), _TINY)
        iq = 1.0 / max(np.sqrt(qq), _TINY)
        cos_p, cos_q = ap * ia * ip, aq * ia * iq
        margin = cos_p - cos_q
        e = np.exp(-abs(margin))
        total += max(-margin, 0.0) + np.log1p(e)  # -ln sigma(margin)
        # -dL/dcos_p = dL/dcos_q = sigma(-margin) / n
        s = inv_n * (e / (1.0 + e) if margin >= 0 else 1.0 / (1.0 + e))
        ga, gp, gq = grad_users[u[k]], grad_items[i[k]], grad_items[j[k]]
        sa, sp, sq = s * ia, s * ip, s * iq
        for c in range(d):
            ah, ph, qh = a[c] * ia, p[c] * ip, q[c] * iq
            ga[c] += sa * ((qh - cos_q * ah) - (ph - cos_p * ah))
            gp[c] -= sp * (ah - cos_p * ph)
            gq[c] += sq * (ah - cos_q * qh)
    return total * inv_n


@njit(cache=True, nogil=True, fastmath=_FAST)
def contrastive_unlearning(local: np.ndarray, global_: np.ndarray, mask: np.ndarray,
                           count: int, targets: np.ndarray, negatives: np.ndarray, tau: float,
                           positive_in_denominator: bool, grad_local: np.ndarray,
                           grad_global: np.ndarray) -> float:
    """L_CU (Eq. 25): ``(sum_{t in targets} logsumexp_m cos(l_t, f_mt) / tau - sum_{i: mask_i}
    cos(l_i, g_i) / tau) / count``, the positive joining the logsumexp when
    ``positive_in_denominator``; ``negatives[m, k]`` is the normalised forgotten view ``m`` of
    item ``targets[k]``. Adds its gradient to ``grad_local`` and ``grad_global`` (zeros)."""
    d, views = local.shape[1], negatives.shape[0]
    w, inv_tau = 1.0 / max(count, 1), 1.0 / tau
    total = 0.0
    z, cosines = np.empty(views + 1), np.empty(views)
    for r in range(len(local)):  # the positive terms
        if mask[r]:
            il, ig, cos = _inverse_norms_and_cosine(local[r], global_[r])
            total -= cos * inv_tau
            _add_cosine_gradient(local[r], global_[r], il, ig, cos, -w * inv_tau,
                                 grad_local[r], grad_global[r])
    for k in range(len(targets)):  # the forgotten negatives of I_f
        r = targets[k]
        lr, gl = local[r], grad_local[r]
        il, ig, cos = _inverse_norms_and_cosine(lr, global_[r])
        for m in range(views):
            dot = np.float32(0)
            for c in range(d):
                dot += lr[c] * negatives[m, k, c]
            cosines[m] = dot * il
            z[m] = cosines[m] * inv_tau
        z[views] = cos * inv_tau
        size = views + 1 if positive_in_denominator else views
        top = z[:size].max()
        norm = 0.0
        for m in range(size):
            z[m] = np.exp(z[m] - top)
            norm += z[m]
        total += top + np.log(norm)
        for m in range(views):  # dL/dz_m = softmax_m w, z_m = cos(l, f_m) / tau, |f_m| = 1
            g, cos_m = z[m] / norm * w * inv_tau * il, cosines[m] * il
            for c in range(d):
                gl[c] += g * (negatives[m, k, c] - cos_m * lr[c])
        if positive_in_denominator:
            _add_cosine_gradient(lr, global_[r], il, ig, cos, z[views] / norm * w * inv_tau,
                                 gl, grad_global[r])
    return total * w


@njit(cache=True, inline="always", fastmath=_FAST)
def _inverse_norms_and_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """``1 / |a|``, ``1 / |b|`` (norms clamped) and ``cos(a, b)``."""
    aa = bb = ab = np.float32(0)
    for c in range(len(a)):
        aa += a[c] * a[c]
        bb += b[c] * b[c]
        ab += a[c] * b[c]
    ia, ib = 1.0 / max(np.sqrt(aa), _TINY), 1.0 / max(np.sqrt(bb), _TINY)
    return ia, ib, ab * ia * ib


@njit(cache=True, inline="always", fastmath=_FAST)
def _add_cosine_gradient(a: np.ndarray, b: np.ndarray, ia: float, ib: float, cos: float,
                         scale: float, grad_a: np.ndarray, grad_b: np.ndarray) -> None:
    """Adds ``scale * d cos(a, b) / d(a, b)`` to the gradients (``ia = 1 / |a|``)."""
    sa, sb = scale * ia, scale * ib
    for c in range(len(a)):
        ah, bh = a[c] * ia, b[c] * ib
        grad_a[c] += sa * (bh - cos * ah)
        grad_b[c] += sb * (ah - cos * bh)


class KernelLoss(torch.autograd.Function):
    """A scalar loss of two tensors whose gradients a kernel computed with it: backward scales
    them by the incoming gradient."""

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor, value: float,  # type: ignore[override]
                grad_first: Tensor, grad_second: Tensor) -> Tensor:
        ctx.save_for_backward(grad_first, grad_second)
        return first.new_tensor(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:  # type: ignore[override]
        grad_first, grad_second = ctx.saved_tensors
        return grad_first * grad, grad_second * grad, None, None, None


def as_array(x: Tensor) -> np.ndarray:
    """A tensor's values as a C-contiguous float32 array (shared memory where it can be)."""
    return np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)


def cosine_bpr_loss(users: Tensor, items: Tensor, u: np.ndarray, i: np.ndarray,
                    j: np.ndarray) -> Tensor:
    """``mean_k -ln sigma(cos(users[u_k], items[i_k]) - cos(users[u_k], items[j_k]))``:
    :func:`fedshare.losses.bpr_loss` on cosine scores, differentiable w.r.t. both tables."""
    users_a, items_a = as_array(users), as_array(items)
    grad_users, grad_items = np.zeros_like(users_a), np.zeros_like(items_a)
    value = cosine_bpr(users_a, items_a, np.ascontiguousarray(u, dtype=np.int64),
                       np.ascontiguousarray(i, dtype=np.int64),
                       np.ascontiguousarray(j, dtype=np.int64), grad_users, grad_items)
    return KernelLoss.apply(users, items, value, torch.from_numpy(grad_users),
                            torch.from_numpy(grad_items))
