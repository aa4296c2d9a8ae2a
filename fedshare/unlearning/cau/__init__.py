"""CAU: curriculum approximate unlearning for sequence recommenders (centralised reference).

Paper: ``shared/papers/cau_curriculum_approximate_unlearning.txt`` (Sec. 4, Eq. 5-13,
Algorithms 1-2); decisions and traps: ``shared/specs/cau.md``. Pure torch/numpy: nothing here
imports Flower or the sequence backbones; a backbone enters through :class:`model.CAUModel`.

Modules, one idea each:
``model`` (the minimal model interface and the forget samples), ``samples`` (forget samples
from sessions, spec "Samples"), ``losses`` (L_u, L_n, L_KL,
Eq. 5-8), ``mgda`` (the exact three-task min-norm weights, Eq. 10), ``difficulty`` (Eq. 11-12),
``curriculum`` (Algorithm 1 hard batches, Algorithm 2 / Eq. 13 soft sampling), ``unlearn`` (the
CAU loop with its ablations), ``metrics`` (Hit_u@K and the U-score, Eq. 14).

Federated version (planned, not built here). A batch of forget samples spans devices, so:
1. Curriculum: each requesting device scores its own forget samples (``difficulty``) and reports
   only scalar scores (one per sample, no data); the server builds the schedule from those scores
   (``curriculum.hard_batches`` or ``curriculum.soft_batch``) and tells each device which of its
   samples belong to the current batch.
2. MGDA: every unlearning step, each device in the batch computes its three task gradients on its
   part of the batch (sums over its samples, ``unlearn.task_gradients``) and uploads them; the
   server sums them (weighted by sample count, so they equal the batch-mean gradients), forms the
   3x3 Gram matrix of the batch, solves ``mgda.min_norm_weights``, applies the combined update to
   the global model and broadcasts it. MGDA thus sees exactly the centralised batch's Gram matrix;
   the price is one round trip per step carrying three model-sized gradients per device.
3. Cheaper alternative (to be measured beside it): each device runs ``unlearn.cau_unlearn`` alone on
   its own forget samples from the global model (its own frozen reference) and the server averages
   the unlearned parameters weighted by |D_f,u|; one round, but MGDA and the curriculum only see
   one device's samples.
"""
