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

Federated version: :mod:`fedshare.sequences.cau_devices` (the joint form, where devices report
difficulty scores and gradient sums and the server schedules the curriculum and solves MGDA on the
batch's Gram matrix, and the cheaper local form, where each device runs :func:`unlearn.cau_unlearn`
alone and the server averages); through Flower, ``strategies/sequence_unlearning.py``.
"""
