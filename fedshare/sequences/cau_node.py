"""A node's side of sequence unlearning: its requesting devices, their forget samples and what
they compute for the server (Flower-free; :mod:`clients.sequence_unlearning` carries it).

Which devices request is the in-process rule, :func:`sequence_requests` (a seeded 10% of the
training devices, one position each), restricted to the node's sessions, so the union of the
nodes' requests is the CAU table's. (In a deployment a device decides for itself; the seeded
rule stands in for that in simulation.) Everything is computed per device, exactly as the
in-process :func:`fedshare.sequences.cau_devices.joint_cau_by_devices` computes it for that
device, so the server's sums equal that loop's whichever node serves which device:

- the frozen reference P_ref (eval mode, the global model at request time; Eq. 7);
- the difficulties (Eq. 11 or 12, eval mode) of the current model, one per sample;
- a joint step's gradient sums (Eq. 9 times the count) over the device's samples in the batch,
  forward in train mode with the device's dropout seeded by (seed, step, session);
- the local form: each device's :func:`cau_unlearn` alone (seeded as :func:`local_cau`) and
  the |D_f,u|-weighted mean;
- Hit_u indicators of its samples (:mod:`fedshare.sequences.forget_metrics`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from fedshare.sequences.cau_devices import (
    cau_view,
    device_forget_sets,
    device_gradient_sums,
    reference_for,
)
from fedshare.sequences.data import SequenceData
from fedshare.sequences.federated import load_vector
from fedshare.sequences.forget_metrics import forget_hits, request_negatives
from fedshare.sequences.models import SequenceModel
from fedshare.sequences.requests import forget_set, sequence_requests
from fedshare.unlearning.cau.unlearn import CAUConfig, cau_unlearn, score


def node_requests(data: SequenceData, sessions: Sequence[int], fraction: float, seed: int
                  ) -> dict[int, list[int]]:
    """The requests of the node's devices: the run's seeded rule restricted to ``sessions``."""
    mine = {int(s) for s in sessions}
    return {s: p for s, p in sequence_requests(data, fraction, seed).items() if s in mine}


def step_seed(seed: int, step: int, session: int) -> int:
    """A device's dropout seed in one joint step (independent of who serves it)."""
    return int(np.random.default_rng([seed, step, session, 0xCA0]).integers(2 ** 62))


class ForgetDevices:
    """A node's requesting devices (module docstring).

    Args:
        data: the sessions (the node reads only its own).
        sessions: the node's sessions.
        model: a model of the run's architecture (a working copy is kept).
        fraction, seed: the request rule's; ``seed`` also draws the Hit_u negatives.
    """

    def __init__(self, data: SequenceData, sessions: Sequence[int], model: SequenceModel,
                 fraction: float, seed: int) -> None:
        self.requests = node_requests(data, sessions, fraction, seed)
        self.lengths = {s: len(data.session(s)) for s in self.requests}
        self.forget, owners = forget_set(data, self.requests)
        self.devices = device_forget_sets(self.forget, owners)
        self.negatives = request_negatives(data, self.requests, seed)
        self.model = copy.deepcopy(model)
        self.view = cau_view(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def __len__(self) -> int:
        return len(self.forget)

    def _rows(self, per_device: list[Tensor]) -> Tensor:
        out = torch.empty(len(self), *per_device[0].shape[1:], dtype=per_device[0].dtype)
        for d, values in zip(self.devices, per_device, strict=True):
            out[torch.from_numpy(d.rows)] = values
        return out

    def reference(self, vector: Tensor) -> Tensor:
        """log P_ref ``[N, n_items]`` of every sample under the global model ``vector``."""
        if not len(self):
            return torch.zeros(0, 0)
        return self._rows([reference_for(self.model, vector, d.samples) for d in self.devices])

    def scores(self, vector: Tensor, ref: Tensor, config: CAUConfig) -> np.ndarray:
        """Every sample's difficulty under ``vector`` (Eq. 11 or 12)."""
        load_vector(self.model, vector)
        out = np.empty(len(self))
        for d in self.devices:
            out[d.rows] = score(self.view, d.samples, ref[torch.from_numpy(d.rows)], config)
        return out

    def gradient_sums(self, vector: Tensor, ref: Tensor, samples: np.ndarray, step: int,
                      config: CAUConfig) -> tuple[Tensor, int]:
        """The ``[3, P]`` gradient sums over ``samples`` (node indices), and their count."""
        load_vector(self.model, vector)
        self.model.train(config.train_mode)
        total, count = torch.zeros(3, vector.numel()), 0
        for d in self.devices:
            mine = np.flatnonzero(np.isin(d.rows, samples))
            if not len(mine):
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(config.seed, step, d.session))
                total += device_gradient_sums(self.view, d.samples.subset(mine.tolist()),
                                              ref[torch.from_numpy(d.rows[mine])], self.params)
            count += len(mine)
        return total, count

    def local(self, vector: Tensor, config: CAUConfig) -> tuple[Tensor, int]:
        """The local form: each device's CAU alone from ``vector`` (seeded as
        :func:`fedshare.sequences.cau_devices.local_cau`); the |D_f,u|-weighted mean vector
        and the summed |D_f,u|."""
        total = torch.zeros_like(vector, dtype=torch.float64)
        for d in self.devices:
            load_vector(self.model, vector)
            own = dataclasses.replace(config, seed=config.seed * 1_000_003 + d.session)
            cau_unlearn(self.view, d.samples, own)
            total += len(d.rows) * parameters_to_vector(self.model.parameters()).detach().double()
        if not len(self):
            return vector.clone(), 0
        return (total / len(self)).to(vector.dtype), len(self)

    def hits(self, vector: Tensor) -> dict[str, np.ndarray]:
        """Hit_u indicators of every sample under ``vector``."""
        load_vector(self.model, vector)
        return forget_hits(self.model, self.forget, self.negatives)
