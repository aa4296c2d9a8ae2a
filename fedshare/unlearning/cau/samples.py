"""Forget samples from sessions (spec "Samples"), in the form :class:`model.ForgetSet` holds.

A session is one user's time-ordered item ids v_1..v_n. A request forgets position t
(1-based, 2 <= t <= n-1): prefix p = v_1..v_{t-1}, forget target f = v_t, retain target
r = v_{t+1}. Several forgotten positions in one session are separate samples; earlier
forgotten items are removed from later samples' prefixes, and r is the first later item that is
not itself forgotten (the next item of the remaining session D_r; v_n is never forgotten, so it
exists). Prefixes are left-truncated to the last ``max_len`` items and left-padded with 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedshare.unlearning.cau.model import ForgetSet


def remaining_session(session: Sequence[int], positions: Sequence[int]) -> list[int]:
    """D_r's version of a session: the forgotten positions (1-based) deleted."""
    drop = set(positions)
    return [v for j, v in enumerate(session, start=1) if j not in drop]


def build_forget_set(
    sessions: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    requests: Mapping[int, Sequence[int]],
    max_len: int,
) -> tuple[ForgetSet, list[int]]:
    """The forget samples of ``requests`` (session key -> forgotten positions, 1-based) and,
    per sample, its session key (for sampling Hit_u negatives outside the session)."""
    prefixes, forget, retain, owner = [], [], [], []
    for key in sorted(requests):
        sess = list(sessions[key])
        pos = sorted(set(requests[key]))
        for t in pos:
            if not 2 <= t <= len(sess) - 1:
                raise ValueError(f"session {key}: position {t} outside [2, {len(sess) - 1}]")
            later = [sess[j - 1] for j in range(t + 1, len(sess) + 1) if j not in pos]
            prefix = [sess[j - 1] for j in range(1, t) if j not in pos][-max_len:]
            prefixes.append([0] * (max_len - len(prefix)) + prefix)
            forget.append(sess[t - 1])
            retain.append(later[0])
            owner.append(key)
    return (
        ForgetSet(
            torch.tensor(prefixes, dtype=torch.long).reshape(-1, max_len),
            torch.tensor(forget, dtype=torch.long),
            torch.tensor(retain, dtype=torch.long),
        ),
        owner,
    )
