"""Upload defences: what a device does to its train reply so the server cannot read its local
interactions from it (issue 20; threat model in the README, "Privacy of local interactions").

A one-user device's plain reply marks its local items: every local item's row is touched (and
weighted), and the touched rows' deltas split along one direction into positives and sampled
negatives (``fedshare privacy-audit`` measures it). The defences, combined with ``+`` in the
run-config key ``defence``:

- ``secagg``: the server learns only the sum over a round's devices (SecAgg+, Flower's protocol
  pieces; :mod:`strategies.secagg`, :mod:`clients.secagg`). The per-row weights are summed too.
- ``hidden``: devices decide themselves whether they train in a round (probability ``fraction``,
  from a device-private stream), and every online device answers every round (a zero update
  when it does not train), so the server does not know whose update a sum holds. With
  ``secagg`` this closes the disaggregation attack (differences of sums between the rounds a
  user did and did not take part in), which works against ``secagg`` alone.
- ``non-marking``: the device uploads a fixed-size set of rows (``decoy-rows``; 0 = the full
  table) with every row weighted alike, and Gaussian decoy deltas scaled like its real ones on
  the rows it did not train, so *which* rows changed says nothing. The decoys go into the
  average: their cost is measured, not assumed.
- ``ldp``: local differential privacy: the full-table delta is clipped to L2 norm ``ldp-clip``
  and Gaussian noise of std ``ldp-noise * 2 * ldp-clip`` is added to every coordinate (the
  Gaussian mechanism; 2C is the L2 sensitivity of a clipped upload when the user's local data
  change arbitrarily). :func:`ldp_epsilon` accounts over the user's participations.

Randomness is the device's own: a counter stream keyed by :data:`DEVICE_KEY`, the run seed,
round and user, and the device's **secret**. The server knows the run seed, so without the
secret it could recompute who self-sampled, the decoys and the noise, and undo all three. A
deployed device draws a secret once and keeps it in its state directory (:mod:`clients.app`);
simulated nodes use secret 0, so simulations are reproducible and both engines draw alike (the
streams with secret 0 are those of the seed alone).

Flower's ``LocalDpMod`` does not fit here: it clips the whole reply of a node against the
request's arrays, while a cohort node must clip each of its users and a reply
carries per-row weights; the mechanism is the same Gaussian one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedshare.errors import FedShareError
from fedshare.sampling import counter_hash

DEFENCES = ("secagg", "hidden", "non-marking", "ldp")
DEVICE_KEY = 0xDEFE
"""Stream key of a device's private draws (participation, decoys, noise)."""


def parse_defences(text: str) -> tuple[str, ...]:
    """``"secagg+hidden"`` -> ``("secagg", "hidden")``; ``"none"`` or ``""`` -> ``()``."""
    names = tuple(n.strip() for n in str(text).split("+") if n.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in DEFENCES]
    if unknown:
        raise FedShareError(f"unknown defence {unknown[0]!r}; combine with '+' any of "
                            f"{', '.join(DEFENCES)} (or 'none')")
    if len(set(names)) != len(names):
        raise FedShareError(f"defence {text!r} names one defence twice")
    if "non-marking" in names and "ldp" in names:
        raise FedShareError("non-marking and ldp both decide which rows are uploaded; "
                            "choose one")
    return names


@dataclass(frozen=True)
class UploadDefence:
    """The client-side part of a ``defence`` setting (see module docstring).

    Args:
        names: the combined defences (:func:`parse_defences`).
        decoy_rows: rows a non-marking upload holds (0 = every row of the table).
        ldp_clip: C, the L2 norm every LDP upload is clipped to.
        ldp_noise: z, noise std in units of the sensitivity 2C.
        ldp_delta: the delta of the reported (epsilon, delta).
    """

    names: tuple[str, ...] = ()
    decoy_rows: int = 0
    ldp_clip: float = 1.0
    ldp_noise: float = 1.0
    ldp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.decoy_rows < 0:
            raise FedShareError("decoy-rows must be >= 0 (0 = the full table)")
        if self.ldp_clip <= 0 or self.ldp_noise < 0:
            raise FedShareError("ldp-clip must be > 0 and ldp-noise >= 0")
        if not 0 < self.ldp_delta < 1:
            raise FedShareError("ldp-delta must lie in (0, 1)")

    @property
    def rewrites_rows(self) -> bool:
        """Whether each user's upload is rewritten before it is averaged."""
        return "non-marking" in self.names or "ldp" in self.names

    @property
    def hidden(self) -> bool:
        return "hidden" in self.names

    @property
    def secure(self) -> bool:
        return "secagg" in self.names


def _keys(secret: int) -> tuple[int, ...]:
    """The secret joins the stream's keys only when set: secret 0 keeps the seed's stream."""
    return (int(secret),) if secret else ()


def device_generator(seed: int, round_: int, user: int, secret: int = 0) -> torch.Generator:
    """The device's private stream for one round."""
    generator = torch.Generator()
    generator.manual_seed(int(counter_hash(DEVICE_KEY, seed, round_, user, *_keys(secret))
                              >> np.uint64(1)))
    return generator


def self_sampled(users: np.ndarray, fraction: float, seed: int, round_: int,
                 secret: int = 0) -> np.ndarray:
    """``hidden`` participation: the users whose device chose to train in ``round_``, each
    with probability ``fraction`` on its private stream (the server cannot compute this when
    the device has a secret)."""
    users = np.asarray(users, dtype=np.int64)
    draws = (counter_hash(DEVICE_KEY, seed, round_, users, 1, *_keys(secret))
             >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return users[draws < fraction]


def defend_upload(items: Tensor, deltas: Tensor, num_items: int, defence: UploadDefence,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One user's upload after the row-rewriting defences.

    Args:
        items: the rows the user trained (touched), ``[r]``.
        deltas: their deltas ``V_u[items] - V_s[items]``, ``[r, d]``.
        num_items: rows of the table.
        defence: the settings.
        generator: the device's private stream.

    Returns:
        ``(rows, row_deltas)``: the rows uploaded (each weighted with the user's |D_u|) and
        their deltas. Without a row-rewriting defence, the input.
    """
    if not defence.rewrites_rows:
        return items, deltas
    dim = deltas.shape[1]
    if "ldp" in defence.names:
        dense = torch.zeros(num_items, dim, dtype=deltas.dtype)
        dense[items] = deltas
        norm = float(dense.norm())
        if norm > defence.ldp_clip:
            dense *= defence.ldp_clip / norm
        std = defence.ldp_noise * 2.0 * defence.ldp_clip
        dense += std * torch.randn(num_items, dim, generator=generator, dtype=deltas.dtype)
        return torch.arange(num_items), dense
    size = num_items if defence.decoy_rows == 0 else max(defence.decoy_rows, len(items))
    size = min(size, num_items)
    free = torch.ones(num_items, dtype=torch.bool)
    free[items] = False
    candidates = torch.nonzero(free).flatten()
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:size - len(items)]]
    scale = float(deltas.std()) if deltas.numel() > 1 else 0.0
    decoys = scale * torch.randn(len(pick), dim, generator=generator, dtype=deltas.dtype)
    rows = torch.cat([items, pick])
    order = torch.argsort(rows)  # row order says nothing either
    return rows[order], torch.cat([deltas, decoys])[order]


def ldp_epsilon(noise: float, participations: int, delta: float) -> float:
    """Epsilon of ``participations`` Gaussian-mechanism uploads with noise multiplier ``noise``
    (std / sensitivity), by Renyi-DP composition (Mironov 2017): each upload is
    (alpha, alpha / (2 z^2))-RDP, so R of them are (alpha, R alpha / (2 z^2))-RDP, and
    eps = min_alpha R alpha / (2 z^2) + log(1/delta) / (alpha - 1)
        = R / (2 z^2) + sqrt(2 R log(1/delta)) / z   (at alpha = 1 + z sqrt(2 log(1/delta) / R)).
    No amplification by sampling is claimed (the server knows who trained unless ``hidden``).
    """
    if participations <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    r = float(participations)
    return r / (2 * noise**2) + math.sqrt(2 * r * math.log(1 / delta)) / noise
