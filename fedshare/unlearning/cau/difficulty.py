"""Unlearning difficulty of each forget sample (Eq. 11-12); low = easy = scheduled first.

Gradient difficulty (Eq. 11): Dif_g(x) = -cos(grad l_u(x), grad l_n(x) + grad l_KL(x)), how much
forgetting x conflicts with retaining. Two variants (spec "Difficulty"):
- ``gradient_difficulty(..., params)``: per-sample autograd gradients over ``params``; with all
  trainable parameters this is the faithful full-model Eq. 11 (per-sample gradients through
  ``torch.func`` vmap where the backbone allows it, else a per-sample loop: costly, fine for a
  device's few samples).
- ``last_layer_gradient_difficulty``: the exact closed form for an output layer
  logits = W h (+ b). The gradients w.r.t. the logits are e_f - P (of log P_f) and
  (P - e_r) + (P - P_ref) (of -log P_r and of KL(P_ref||P)); w.r.t. (W, b) each is that vector
  times [h; 1]^T, and the cosine of two outer products with the same right factor is the cosine
  of the left factors. So Dif_g_last = -cos(e_f - P, 2P - e_r - P_ref): O(n_items) per sample, no
  backward. It equals ``gradient_difficulty(..., model.last_layer)`` (tested).
Scores are computed in eval mode (no dropout) so a schedule is deterministic; in eval mode at
theta = theta_ref the KL gradient is zero and Eq. 11 reduces to -cos(g_u, g_n), as it should.

Embedding difficulty (Eq. 12): Dif_e(x) = <h(p), w_f>, the session state against the output-layer
row of f: the model's own confidence in f (a logit without its bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedshare.unlearning.cau.losses import kl_loss, normal_loss, unlearn_loss
from fedshare.unlearning.cau.model import CAUModel, ForgetSet, item_log_probs

_EPS = 1e-12


class _EvalMode:
    """Context: the module in eval mode, restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was)


def _neg_cos(u: Tensor, v: Tensor) -> Tensor:
    """-cos(u, v) row-wise; 0 when either vector is zero (no direction, no conflict)."""
    den = u.norm(dim=-1) * v.norm(dim=-1)
    return torch.where(den > _EPS, -(u * v).sum(-1) / den.clamp_min(_EPS), torch.zeros_like(den))


@torch.no_grad()
def last_layer_gradient_difficulty(
    model: CAUModel, samples: ForgetSet, ref_log_probs: Tensor
) -> Tensor:
    """Eq. 11 restricted to the output layer, in closed form: -cos(e_f - P, 2P - e_r - P_ref)."""
    with _EvalMode(model.module):
        p = item_log_probs(model.logits(samples.prefixes)).exp()
    rows = torch.arange(p.shape[0])
    u = -p.clone()
    u[rows, samples.forget - 1] += 1.0
    v = 2.0 * p - ref_log_probs.exp()
    v[rows, samples.retain - 1] -= 1.0
    return _neg_cos(u, v)


def gradient_difficulty(
    model: CAUModel,
    samples: ForgetSet,
    ref_log_probs: Tensor,
    params: Sequence[nn.Parameter] | None = None,
    vectorized: bool = True,
) -> Tensor:
    """Eq. 11 by per-sample autograd over ``params`` (default: every trainable parameter).

    ``vectorized``: per-sample gradients by ``torch.func`` (vmap of jacrev); a backbone whose
    forward vmap cannot batch falls back to a loop of one forward and two backwards per sample.
    """
    if params is None:
        params = [p for p in model.module.parameters() if p.requires_grad]
    ps = list(params)
    with _EvalMode(model.module):
        if vectorized:
            try:
                return _vmapped(model, samples, ref_log_probs, ps)
            except (RuntimeError, NotImplementedError, KeyError, ValueError):
                pass
        return _looped(model, samples, ref_log_probs, ps)


def _two_losses(lp: Tensor, f: Tensor, r: Tensor, ref: Tensor) -> Tensor:
    """(l_u, l_n + l_KL) of one or more samples, stacked: the two sides of Eq. 11."""
    return torch.stack([unlearn_loss(lp, f), normal_loss(lp, r) + kl_loss(lp, ref)])


def _vmapped(model: CAUModel, samples: ForgetSet, ref: Tensor, ps: list[nn.Parameter]) -> Tensor:
    from torch.func import functional_call, jacrev, vmap

    names = {id(p): n for n, p in model.module.named_parameters()}
    chosen = {names[id(p)]: p.detach() for p in ps}

    def per_sample(theta: dict[str, Tensor], x: Tensor, f: Tensor, r: Tensor, rf: Tensor):
        out = functional_call(model.module, theta, (x.unsqueeze(0),))
        logits = out[:, -1, :] if out.dim() == 3 else out
        return _two_losses(item_log_probs(logits), f[None], r[None], rf[None])

    jac = vmap(jacrev(per_sample), in_dims=(None, 0, 0, 0, 0))(
        chosen, samples.prefixes, samples.forget, samples.retain, ref
    )
    n = len(samples)
    flat = torch.cat([jac[k].reshape(n, 2, -1) for k in chosen], dim=2).detach()
    return _neg_cos(flat[:, 0], flat[:, 1])


def _looped(model: CAUModel, samples: ForgetSet, ref: Tensor, ps: list[nn.Parameter]) -> Tensor:
    out = torch.empty(len(samples))
    for i in range(len(samples)):
        lp = item_log_probs(model.logits(samples.prefixes[i : i + 1]))
        two = _two_losses(lp, samples.forget[i : i + 1], samples.retain[i : i + 1], ref[i : i + 1])
        g_u = torch.autograd.grad(two[0], ps, retain_graph=True, allow_unused=True)
        g_r = torch.autograd.grad(two[1], ps, allow_unused=True)
        flat_u = torch.cat([_flat(g, p) for g, p in zip(g_u, ps, strict=True)])
        flat_r = torch.cat([_flat(g, p) for g, p in zip(g_r, ps, strict=True)])
        out[i] = _neg_cos(flat_u, flat_r)
    return out


def _flat(g: Tensor | None, p: nn.Parameter) -> Tensor:
    return torch.zeros(p.numel()) if g is None else g.reshape(-1).detach()


@torch.no_grad()
def embedding_difficulty(model: CAUModel, samples: ForgetSet) -> Tensor:
    """Eq. 12: <h(p), w_f> per sample (needs ``session_state`` and ``item_weights``)."""
    if model.session_state is None or model.item_weights is None:
        raise ValueError("embedding difficulty needs session_state and item_weights")
    with _EvalMode(model.module):
        h = model.session_state(samples.prefixes)
        w = model.item_weights()[samples.forget]
    return (h * w).sum(dim=1)
