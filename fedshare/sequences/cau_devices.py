"""CAU across devices (issue 17): where the curriculum and the MGDA weights are computed.

Each requesting device holds its own forget samples (:func:`device_forget_sets`) and the frozen
reference P_ref, the global model at request time, cached for its own samples. A batch of CAU
spans devices, so two federated forms are offered, both measured in ``fedshare cau-table``:

**Joint** (the default; :func:`joint_cau`). The server runs Algorithms 1-2 over the union of the
devices' samples:

1. *Curriculum.* Each requesting device scores its own samples under the current global model
   (Eq. 11 or 12; every score is a per-sample quantity, so a device's scores equal the union's)
   and uploads one float per sample, no data. The server sorts (hard) or samples (soft, Eq. 13)
   the batch from the scores and tells each device which of its samples are in it.
2. *Pareto weights.* Every step, each device in the batch uploads the sums over its batch
   samples of the three task gradients (:func:`device_gradient_sums`); the server adds them and
   divides by the batch size, which gives exactly the batch-mean gradients (Eq. 9) of the
   centralised algorithm, forms their 3x3 Gram matrix, solves Eq. 10, applies one Adam step on
   the global model along sum_i a_i g_i and broadcasts it.

MGDA therefore sees the centralised batch's Gram matrix, and the joint form *is* the centralised
CAU on the union (tested: per-device sums equal the union's gradients). In process it is run as
that, in one vectorised forward per step; the devices' dropout streams differ from one batch
forward's, the only difference, and both are seeded. The price is traffic: one round trip per
step carrying three model-sized gradients per device in the batch, counted by
:func:`joint_traffic`.

**Local** (the cheaper alternative; :func:`local_cau`). Each requesting device runs CAU alone on
its own samples from the global model (its own frozen reference), uploads the unlearned
parameters once, and the server averages them weighted by |D_f,u| (the spec's federated
placement). One round trip per device, but MGDA and the curriculum see one device's samples
(one sample each under the default requests), and averaging dilutes every device's update.

Timing: the seconds returned are the unlearning's compute alone (scoring, gradients, solver,
updates, averaging); message latency is not simulated in process.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from fedshare.federated.traffic import FLOAT, ID, Traffic
from fedshare.sequences.federated import load_vector
from fedshare.sequences.models import SequenceModel
from fedshare.unlearning.cau.losses import reference_log_probs, task_losses
from fedshare.unlearning.cau.mgda import combine
from fedshare.unlearning.cau.model import CAUModel, ForgetSet, item_log_probs
from fedshare.unlearning.cau.unlearn import (
    CAUConfig,
    CAUResult,
    cau_unlearn,
    schedule,
    score,
    solve_weights,
)


class LastLogits(nn.Module):
    """A backbone as CAU's model interface expects it: prefixes -> last-position logits
    (pad column at -inf, dropped by :func:`item_log_probs`). Shares the backbone's parameters."""

    def __init__(self, backbone: SequenceModel) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, prefixes: Tensor) -> Tensor:
        return self.backbone.scores(self.backbone(prefixes)[:, -1])


def cau_view(backbone: SequenceModel) -> CAUModel:
    """The :class:`CAUModel` of a sequence backbone: its output projection is the last layer,
    the last position's hidden state is the session state h(p) and the output rows are e_x
    (Eq. 12)."""
    return CAUModel(LastLogits(backbone), backbone.last_layer_parameters(),
                    lambda prefixes: backbone(prefixes)[:, -1], backbone.output_weight)


@dataclass(frozen=True)
class DeviceForgetSet:
    """One requesting device's samples (``session`` is the device) and their place in the
    union (``rows``), which is ordered by session as :func:`build_forget_set` orders it."""

    session: int
    samples: ForgetSet
    rows: np.ndarray


def device_forget_sets(forget: ForgetSet, owners: Sequence[int]) -> list[DeviceForgetSet]:
    """Split the union's samples by the session (device) that owns them."""
    owners = np.asarray(owners, dtype=np.int64)
    return [DeviceForgetSet(int(s), forget.subset(np.flatnonzero(owners == s).tolist()),
                            np.flatnonzero(owners == s)) for s in np.unique(owners)]


def device_gradient_sums(model: CAUModel, samples: ForgetSet, ref_log_probs: Tensor,
                         params: Sequence[nn.Parameter]) -> Tensor:
    """What a device uploads in a joint step: ``[3, P]`` sums over its batch samples of the
    gradients of l_u, l_n and l_KL (n_u times the gradients of its own batch means)."""
    lp = item_log_probs(model.logits(samples.prefixes))
    losses = task_losses(lp, ref_log_probs, samples.forget, samples.retain)
    rows = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss * len(samples), params, retain_graph=i < 2,
                                    allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1)
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows).detach()


def server_batch_gradients(sums: Sequence[Tensor], counts: Sequence[int]) -> Tensor:
    """The batch-mean task gradients from the devices' sums (Eq. 9 over the whole batch)."""
    return torch.stack(list(sums)).sum(0) / max(sum(counts), 1)


def vector_bytes(num_parameters: int) -> int:
    """A flat float32 model or gradient vector on the wire."""
    return num_parameters * FLOAT


def scoring_rounds(config: CAUConfig) -> int:
    """How often every requesting device scores its samples: once an epoch for the hard and
    soft curricula (``unlearn`` rescores soft sampling every ceil(|D_f|/B) steps, i.e. once an
    epoch too), never without a curriculum."""
    return config.epochs if config.schedule in ("hard", "soft") else 0


def joint_traffic(result: CAUResult, devices: Sequence[DeviceForgetSet], num_parameters: int,
                  config: CAUConfig) -> Traffic:
    """Messages and bytes of the joint form, from the schedule the run followed: every
    scoring round, each requesting device gets the model and returns one float per sample;
    every step, each device with samples in the batch gets the model and its sample indices
    and returns three gradient sums and its count."""
    traffic = Traffic()
    owner = np.empty(sum(len(d.rows) for d in devices), dtype=np.int64)
    for d in devices:
        owner[d.rows] = d.session
    model = vector_bytes(num_parameters)
    for _ in range(scoring_rounds(config)):
        for d in devices:
            traffic.add([d.session], model, FLOAT * len(d.rows))
    for batch in result.batches:
        sessions, counts = np.unique(owner[batch], return_counts=True)
        for session, count in zip(sessions.tolist(), counts.tolist(), strict=True):
            traffic.add([session], model + ID * count, 3 * model + FLOAT)
    return traffic


@dataclass
class FederatedCAU:
    """One federated CAU run: the unlearned global vector, the compute seconds, the traffic
    and, for the joint form, the run's schedule, weights and losses."""

    vector: Tensor
    seconds: float
    traffic: Traffic
    result: CAUResult | None = None


def joint_cau(backbone: SequenceModel, start: Tensor, forget: ForgetSet, owners: Sequence[int],
              config: CAUConfig) -> FederatedCAU:
    """The joint form (module docstring) from the global vector ``start``."""
    model = copy.deepcopy(backbone)
    load_vector(model, start)
    started = time.perf_counter()
    result = cau_unlearn(cau_view(model), forget, config)
    seconds = time.perf_counter() - started
    vector = parameters_to_vector(model.parameters()).detach()
    traffic = joint_traffic(result, device_forget_sets(forget, owners), vector.numel(), config)
    return FederatedCAU(vector, seconds, traffic, result)


def local_cau(backbone: SequenceModel, start: Tensor, forget: ForgetSet, owners: Sequence[int],
              config: CAUConfig) -> FederatedCAU:
    """The local form: each device's CAU alone (its seed offset by its session, so devices
    draw independent dropout), then the |D_f,u|-weighted mean of the unlearned vectors."""
    model = copy.deepcopy(backbone)
    traffic = Traffic()
    total = torch.zeros_like(start, dtype=torch.float64)
    weight = 0
    started = time.perf_counter()
    for device in device_forget_sets(forget, owners):
        load_vector(model, start)
        own = dataclasses.replace(config, seed=config.seed * 1_000_003 + device.session)
        cau_unlearn(cau_view(model), device.samples, own)
        total += len(device.rows) * parameters_to_vector(model.parameters()).detach().double()
        weight += len(device.rows)
        traffic.add([device.session], vector_bytes(start.numel()),
                    vector_bytes(start.numel()) + FLOAT)
    vector = (total / max(weight, 1)).to(start.dtype) if weight else start.clone()
    return FederatedCAU(vector, time.perf_counter() - started, traffic)


class JointServer:
    """The server's side of a joint step: the global vector under a server-side optimiser
    (Adam, lr 1e-3, as the paper's CAU), the batch gradients from the devices' sums, the
    MGDA weights (Eq. 10) and the update along sum_i a_i g_i (Eq. 8). Adam is elementwise, so
    one flat vector steps exactly as the model's separate parameters do."""

    def __init__(self, start: Tensor, config: CAUConfig) -> None:
        self.config = config
        self.weights = nn.Parameter(start.detach().clone())
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.Adam([self.weights], lr=config.lr) if config.optimizer == "adam"
            else torch.optim.SGD([self.weights], lr=config.lr))

    @property
    def vector(self) -> Tensor:
        return self.weights.detach()

    def step(self, sums: Sequence[Tensor], counts: Sequence[int]) -> np.ndarray:
        """Apply one step from the devices' uploads; returns (a_u, a_n, a_KL)."""
        grads = server_batch_gradients(sums, counts)
        a = solve_weights(grads, self.config)
        self.weights.grad = combine(grads, a)
        self.optimizer.step()
        return a


def joint_cau_by_devices(backbone: SequenceModel, start: Tensor, forget: ForgetSet,
                         owners: Sequence[int], config: CAUConfig) -> FederatedCAU:
    """The joint form message by message: each device scores and differentiates only its own
    samples on its own copy of the broadcast model; the server schedules (:func:`schedule`)
    and steps (:class:`JointServer`). What a Flower server does; in process it is the
    reference that :func:`joint_cau`'s vectorised run is tested against."""
    devices = device_forget_sets(forget, owners)
    model = copy.deepcopy(backbone)
    view = cau_view(model)
    params = [p for p in model.parameters() if p.requires_grad]
    refs = {d.session: reference_for(backbone, start, d.samples) for d in devices}
    server = JointServer(start, config)
    result = CAUResult()
    started = time.perf_counter()

    def scores() -> np.ndarray:
        load_vector(model, server.vector)
        out = np.empty(len(forget))
        for d in devices:
            out[d.rows] = score(view, d.samples, refs[d.session], config)
        return out

    torch.manual_seed(config.seed)
    for batch in schedule(scores, len(forget), config):
        load_vector(model, server.vector)
        model.train(config.train_mode)
        sums, counts = [], []
        for d in devices:
            mine = np.flatnonzero(np.isin(d.rows, batch))
            if len(mine):
                sums.append(device_gradient_sums(view, d.samples.subset(mine.tolist()),
                                                 refs[d.session][mine], params))
                counts.append(len(mine))
        result.weights.append(server.step(sums, counts))
        result.batches.append(np.asarray(batch))
    seconds = time.perf_counter() - started
    traffic = joint_traffic(result, devices, start.numel(), config)
    return FederatedCAU(server.vector.clone(), seconds, traffic, result)


def reference_for(backbone: SequenceModel, start: Tensor, samples: ForgetSet) -> Tensor:
    """A device's cached log P_ref of its samples under the global model ``start``."""
    model = copy.deepcopy(backbone)
    load_vector(model, start)
    return reference_log_probs(cau_view(model), samples.prefixes)
