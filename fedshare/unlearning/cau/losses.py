"""The three CAU task losses (Eq. 5-8), batch means over forget samples.

L_u = mean log P(f|p) (Eq. 5): minimising it is gradient ascent on the forget item and is
unbounded below, which is why it never runs alone except in the "w/o RL" ablation.
L_n = mean -log P(r|p) (Eq. 6): keeps the session's next item r = v_{t+1} predictable from the
prefix without v_t. L_KL = mean KL(P_ref(.|p) || P_theta(.|p)) (Eq. 7): P_ref is the frozen
reference (the global model at request time), cached once per sample by
:func:`reference_log_probs`. Eq. 8 combines them with weights from ``mgda``.

The zero-KL-gradient trap: at theta = theta_ref, L_KL has its minimum, so its gradient is exactly
zero (in eval mode) and min-norm MGDA would put all weight on it (d = 0, nothing moves). Handled
in two places: the unlearning forward runs in train mode (dropout makes P_theta differ from the
cached eval-mode P_ref), and ``mgda.active_tasks`` drops tasks whose gradient norm is < 1e-10 from
the solver for that step.
"""

from __future__ import annotations

from torch import Tensor

from fedshare.unlearning.cau.model import CAUModel, item_log_probs


def _pick(log_probs: Tensor, items: Tensor) -> Tensor:
    """log P(item|p) per row; item ids >= 1 map to column id - 1."""
    return log_probs.gather(1, (items - 1).unsqueeze(1)).squeeze(1)


def unlearn_loss(log_probs: Tensor, forget: Tensor) -> Tensor:
    """Eq. 5: mean log P(f|p)."""
    return _pick(log_probs, forget).mean()


def normal_loss(log_probs: Tensor, retain: Tensor) -> Tensor:
    """Eq. 6: mean -log P(r|p)."""
    return -_pick(log_probs, retain).mean()


def kl_loss(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Eq. 7: mean over the batch of KL(P_ref || P_theta) over all items."""
    p_ref = ref_log_probs.exp()
    return (p_ref * (ref_log_probs - log_probs)).sum(dim=1).mean()


def task_losses(
    log_probs: Tensor, ref_log_probs: Tensor, forget: Tensor, retain: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_u, L_n, L_KL) of one batch, in the order of Eq. 8/9."""
    return (
        unlearn_loss(log_probs, forget),
        normal_loss(log_probs, retain),
        kl_loss(log_probs, ref_log_probs),
    )


def combined_loss(losses: tuple[Tensor, Tensor, Tensor], weights: Tensor) -> Tensor:
    """Eq. 8: sum_i a_i L_i with the weights detached (they come from the solver)."""
    a = weights.detach()
    return a[0] * losses[0] + a[1] * losses[1] + a[2] * losses[2]


def reference_log_probs(model: CAUModel, prefixes: Tensor, batch_size: int = 1024) -> Tensor:
    """Cache log P_ref(.|p) ``[N, n_items]`` from the frozen reference in eval mode."""
    return item_log_probs(model.eval_logits(prefixes, batch_size)).detach()
