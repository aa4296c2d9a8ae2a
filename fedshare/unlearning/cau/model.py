"""The minimal model interface CAU needs, and the forget samples it works on.

Decision (the paper leaves the backbone API open): the model is any ``torch.nn.Module`` mapping a
batch of left-padded prefixes ``[B, L]`` (long, pad id 0) to logits over the item vocabulary
including the pad column, either for the last position ``[B, n_items + 1]`` or for every position
``[B, L, n_items + 1]``; in the second case the last position is taken (prefixes are left-padded,
so the last column always holds the prediction after the whole prefix). The pad column 0 is
dropped before any softmax (:func:`item_log_probs`), so item ``i`` is column ``i - 1`` there.

A forget sample is one (prefix, forget target f = v_t, retain target r = v_{t+1}) triple
(spec "Samples"): one position per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class CAUModel:
    """A backbone as CAU sees it.

    ``last_layer``: the output layer's parameters (e.g. ``[out.weight, out.bias]``), used by the
    last-layer gradient difficulty and to name the layer whose closed form is exact.
    ``session_state``: prefixes ``[B, L]`` -> session state ``h(p)`` ``[B, d]`` (Eq. 12).
    ``item_weights``: () -> the output-layer rows ``[n_items + 1, d]`` (Eq. 12's ``e_x``).
    The last two are needed only for embedding difficulty.
    """

    module: nn.Module
    last_layer: Sequence[nn.Parameter]
    session_state: Callable[[Tensor], Tensor] | None = None
    item_weights: Callable[[], Tensor] | None = None

    def logits(self, prefixes: Tensor) -> Tensor:
        """Last-position logits ``[B, n_items + 1]`` (pad column included)."""
        out = self.module(prefixes)
        return out[:, -1, :] if out.dim() == 3 else out


    @torch.no_grad()
    def eval_logits(self, prefixes: Tensor, batch_size: int = 1024) -> Tensor:
        """Last-position logits of ``prefixes`` in eval mode (dropout off), in batches, with
        the module's mode restored after: what the frozen reference and the metrics score."""
        was_training = self.module.training
        self.module.eval()
        try:
            return torch.cat([self.logits(prefixes[i:i + batch_size])
                              for i in range(0, prefixes.shape[0], batch_size)])
        finally:
            self.module.train(was_training)


@dataclass(frozen=True)
class ForgetSet:
    """Forget samples: ``prefixes [N, L]`` long (left-padded), ``forget [N]`` (f = v_t) and
    ``retain [N]`` (r = v_{t+1}) item ids >= 1."""

    prefixes: Tensor
    forget: Tensor
    retain: Tensor

    def __post_init__(self) -> None:
        n = self.prefixes.shape[0]
        if self.forget.shape != (n,) or self.retain.shape != (n,):
            raise ValueError("forget and retain need one target per prefix")
        if n and (int(self.forget.min()) < 1 or int(self.retain.min()) < 1):
            raise ValueError("targets are item ids >= 1 (0 is the pad)")

    def __len__(self) -> int:
        return int(self.prefixes.shape[0])

    def subset(self, idx: Tensor | Sequence[int]) -> ForgetSet:
        """The samples at ``idx`` (a batch)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return ForgetSet(self.prefixes[i], self.forget[i], self.retain[i])


def item_log_probs(logits: Tensor) -> Tensor:
    """log P(.|p) over the real items (pad column 0 dropped): ``[B, n_items]``."""
    return torch.log_softmax(logits[:, 1:], dim=-1)
