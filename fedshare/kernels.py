"""Every numba kernel of fedshare, compiled (or loaded from numba's cache) in one call.

``make`` runs ``python -m fedshare.kernels`` at install, so no run compiles on its first use; the
bench calls :func:`warm_up` so that no timed section pays the one-time cache load.
"""

from __future__ import annotations

import numpy as np
import torch


def warm_up() -> None:
    """Run every kernel on tiny inputs: client training and averaging
    (:mod:`fedshare.models.local_kernel`), negative sampling (:mod:`fedshare.sampling_kernel`)
    and the server's losses (:mod:`fedshare.loss_kernels`)."""
    from fedshare import loss_kernels
    from fedshare.models.local import LocalTrainConfig, UserBatch, train_local
    from fedshare.sampling import sample_negatives

    batch = UserBatch.from_lists([0, 1], [np.array([1, 2]), np.array([3])],
                                 [np.array([1, 2]), np.array([3])], 8)
    for batch_size in (None, 1):
        update = train_local(batch, torch.zeros(8, 4), torch.zeros(2, 4),
                             LocalTrainConfig(batch_size=batch_size))
        update.weighted_sum(torch.zeros(8, 4), torch.ones(2))
    sample_negatives(np.array([0]), np.array([0]), np.array([1]), 8, 0)
    table = torch.ones(8, 4, requires_grad=True)
    loss_kernels.cosine_bpr_loss(table, table, np.array([0]), np.array([1]), np.array([2]))
    rows = np.ones((8, 4), np.float32)
    for positive_in_denominator in (False, True):
        loss_kernels.contrastive_unlearning(rows, rows, np.ones(8, bool), 8, np.array([1]),
                                            np.ones((2, 1, 4), np.float32), 0.5,
                                            positive_in_denominator, rows.copy(), rows.copy())


if __name__ == "__main__":
    warm_up()
