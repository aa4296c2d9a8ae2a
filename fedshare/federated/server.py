"""The server of the learning phase: shared graph G_s, refinement (Eq. 17-18), snapshots.

The server holds the global item table V_s, its own embeddings of the sharing users (for
LightGCN on G_s; they never leave the server) and the last M tables for unlearning. After
aggregation (Eq. 16) it refines V_s for a few Adam steps on

    L = BPR(G_s) + lambda1 * InfoNCE(V_s[b], LightGCN_L(G_s)[b]) + lambda * ||.||^2   (Eq. 18)

where the local view of item i is its row of the aggregated table and the global view its
LightGCN (L = 3) embedding on G_s initialised from that table (Eq. 17, in-batch negatives).

Choices: BPR on G_s scores with cosine, like the clients (Eq. 15), because clients rank by cosine;
the L2 term covers the rows of the current batches; the Adam state persists across rounds;
``fedshare-fedavg`` instead trains the same BPR alone from V_s and joins the average as one more
client of weight |D_s|. ``cdcgnnfed`` runs the same refinement on G_s mended by predicted edges
(:mod:`fedshare.federated.graph_mending`): propagation, BPR's positives and the edges its
negatives avoid are the mended graph's; D_s itself (``shared``) stays what was uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.graph_mending import Mending, MendSettings, mend
from fedshare.federated.population import NodeUpdate
from fedshare.graph import BipartiteGraph
from fedshare.loss_kernels import cosine_bpr_loss
from fedshare.losses import info_nce, sampled_rows_l2
from fedshare.models.embeddings import xavier_table
from fedshare.sampling import sample_negatives
from fedshare.storage_ledger import SnapshotStore, StorageLedger


class Server:
    """Server state and the per-round server computation of Algorithm 1 (lines 11-13).

    Args:
        shared: D_s, the shared interactions (empty for no-sharing).
        config: the run's settings.
    """

    def __init__(self, shared: Interactions, config: FederatedConfig,
                 ledger: StorageLedger | None = None) -> None:
        self.config = config
        self.num_items = shared.num_items
        generator = torch.Generator().manual_seed(config.seed)
        self.table = xavier_table(shared.num_items, config.dim, generator)
        self.shared = shared
        self.user = torch.nn.Parameter(xavier_table(shared.num_users, config.dim, generator))
        self.item = torch.nn.Parameter(self.table.clone())
        self.optimizer = torch.optim.Adam([self.user, self.item], lr=config.server_refine_lr)
        self.set_shared(shared)
        self.snapshots = SnapshotStore(config.snapshots, ledger)

    def set_shared(self, shared: Interactions) -> None:
        """(Re)build G_s from D_s, e.g. after unsharing (Eq. 19-20).

        D_s is put in a canonical (user, item) order first: the server's batches are drawn by
        position, and D_s arrives in whatever order the nodes' share replies come back.
        """
        keys = np.unique(shared.users * shared.num_items + shared.items)
        shared = Interactions.from_arrays(keys // shared.num_items, keys % shared.num_items,
                                          shared.num_users, shared.num_items)
        self.shared = shared
        edges = self.mended(shared)
        self.graph = BipartiteGraph(edges) if len(shared) and self.config.shares else None
        self._edges_u, self._edges_i = edges.users, edges.items
        self._known = np.unique(self._edges_u * shared.num_items + self._edges_i)
        # items with an edge in G_s: the rows InfoNCE (Eq. 17) and L_CU (Eq. 25) range over
        self.graph_items = torch.from_numpy(np.flatnonzero(shared.item_degrees() > 0))

    def mended(self, shared: Interactions) -> Interactions:
        """The edges of G_s: D_s, plus CDCGNNFed's predicted edges (mended afresh from this
        D_s, so after unsharing none derives from unshared data)."""
        self.mending: Mending | None = None
        if self.config.variant == "cdcgnnfed" and len(shared):
            self.mending = mend(shared, MendSettings.from_config(self.config))
            return self.mending.edges
        return shared

    def mending_stats(self) -> dict[str, float | None] | None:
        """What the last mending did (``None``: no mending), for ``summary.json``."""
        return None if self.mending is None else self.mending.stats.to_dict()

    @property
    def trains_on_graph(self) -> bool:
        return self.graph is not None and self.config.server_steps > 0

    @property
    def ledger(self) -> StorageLedger:
        return self.snapshots.ledger

    def snapshot_bytes(self) -> int:
        return self.snapshots.nbytes

    def bpr_loss(self, users_g: Tensor, items_g: Tensor, rng: np.random.Generator,
             round_: int, step: int) -> Tensor:
        """Cosine BPR on a batch of G_s's edges (compiled, with its gradient) + L2 of its rows
        (Eq. 15 on the server's graph; the BPR term of Eq. 18 and of Algorithm 2, line 15)."""
        n = min(self.config.server_batch_size, len(self._edges_u))
        pick = rng.choice(len(self._edges_u), size=n, replace=False)
        u, i = self._edges_u[pick], self._edges_i[pick]
        j = sample_negatives(u, np.arange(n), self._known, self.num_items, self.config.seed,
                             (round_ << 16) + step)
        reg = (sampled_rows_l2(self.user, torch.from_numpy(u))
               + sampled_rows_l2(self.item, torch.from_numpy(np.concatenate([i, j])))) / n
        return cosine_bpr_loss(users_g, items_g, u, i, j) + self.config.reg * reg

    def _train_on_graph(self, start: Tensor, round_: int, contrastive: bool,
                        steps: int | None = None) -> Tensor:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, round_, 0xC0FFEE])
        with torch.no_grad():
            self.item.copy_(start)
        for step in range(cfg.server_steps if steps is None else steps):
            users_g, items_g = self.graph.propagate(self.user, self.item, cfg.num_layers)
            loss = torch.zeros(())
            if cfg.uses_bpr or not contrastive:
                loss = loss + self.bpr_loss(users_g, items_g, rng, round_, step)
            if contrastive and cfg.contrastive_weight > 0:
                n = min(cfg.server_batch_size, len(self.graph_items))
                b = self.graph_items[torch.from_numpy(
                    rng.choice(len(self.graph_items), size=n, replace=False))]
                local = self.item.index_select(0, b)
                loss = loss + cfg.contrastive_weight * info_nce(local, items_g.index_select(0, b),
                                                                cfg.tau)
                if not cfg.uses_bpr:
                    loss = loss + cfg.reg * local.pow(2).sum() / n
            self.step(loss)
        return self.item.detach().clone()

    def server_client_update(self, round_: int) -> NodeUpdate | None:
        """FedShare-FedAvg: the server trains on D_s like one more client of weight |D_s|."""
        if self.config.variant != "fedshare-fedavg" or not self.trains_on_graph:
            return None
        table = self._train_on_graph(self.table, round_, contrastive=False)
        changed = (table != self.table).any(dim=1)
        row_weight = changed.float() * float(len(self.shared))
        return NodeUpdate(table, float(len(self.shared)), row_weight, 1)

    def aggregate(self, updates: Sequence[NodeUpdate]) -> Tensor:
        """The local view (Eq. 16) from V_s and the round's updates."""
        return aggregate(self.table, updates, self.config.aggregation, self.config.server_lr)

    @property
    def refines(self) -> bool:
        """Whether a round ends with the refinement of Eq. 18."""
        return self.config.variant in ("fedshare", "wo-cl", "wo-bpr", "cdcgnnfed", "pdc-frs") \
            and self.trains_on_graph

    def refine(self, aggregated: Tensor, round_: int, steps: int | None = None) -> Tensor:
        """Eq. 18 from ``aggregated`` for ``steps`` Adam steps (default: the configured ones)."""
        if not self.refines:
            return aggregated.clone()
        refined = self._train_on_graph(aggregated, round_, contrastive=True, steps=steps)
        pdc = self.config.pdc
        if pdc is not None:  # PDC-FRS: the auxiliary model's step enters with its weight
            refined = aggregated + pdc.weight * (refined - aggregated)
        return refined

    def initial_state(self) -> tuple[Tensor, Tensor]:
        """V_s and the user embeddings as they were before round 1, regenerated from the seed
        (nothing kept): what a retrain starts from."""
        generator = torch.Generator().manual_seed(self.config.seed)
        table = xavier_table(self.num_items, self.config.dim, generator)
        return table, xavier_table(self.user.shape[0], self.config.dim, generator)

    def initial_table(self) -> Tensor:
        """V_s as it was before round 1 (:meth:`initial_state`)."""
        return self.initial_state()[0]

    def checkpoint(self) -> tuple[Tensor, Tensor]:
        """The item table and the server's user embeddings, for a later :meth:`restore`."""
        return self.table.clone(), self.user.detach().clone()

    def restore(self, checkpoint: tuple[Tensor, Tensor]) -> None:
        """Roll the server back to a checkpoint; the refinement optimiser starts afresh."""
        table, user = checkpoint
        self.table = table.clone()
        with torch.no_grad():
            self.user.copy_(user)
            self.item.copy_(table)
        self.optimizer = torch.optim.Adam([self.user, self.item], lr=self.config.server_refine_lr)

    def state(self) -> dict[str, Tensor]:
        """What a resumed run needs beyond V_s and the snapshots: the server's user embeddings
        and the refinement optimiser's Adam moments and step counts (2-D tensors, for the
        state database)."""
        state = {"user": self.user.detach().clone()}
        for name, param in (("user", self.user), ("item", self.item)):
            moments = self.optimizer.state.get(param)
            if moments:
                state[f"adam-{name}-m"] = moments["exp_avg"].clone()
                state[f"adam-{name}-v"] = moments["exp_avg_sq"].clone()
                state[f"adam-{name}-step"] = moments["step"].reshape(1, 1).float().clone()
        return state

    def load_state(self, table: Tensor, state: dict[str, Tensor]) -> None:
        """Continue from a committed round: V_s, the user embeddings and Adam as they were."""
        self.restore((table, state["user"]))
        for name, param in (("user", self.user), ("item", self.item)):
            if f"adam-{name}-m" in state:
                self.optimizer.state[param] = {
                    "step": state[f"adam-{name}-step"].reshape(()).clone(),
                    "exp_avg": state[f"adam-{name}-m"].clone(),
                    "exp_avg_sq": state[f"adam-{name}-v"].clone()}

    def step(self, loss: Tensor) -> None:
        """One Adam step of the refinement optimiser on ``loss`` (user and item embeddings)."""
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def finish_round(self, aggregated: Tensor, round_: int) -> Tensor:
        """Refine the aggregated table on G_s (Eq. 18), keep a snapshot, return the new V_s."""
        table = self.refine(aggregated, round_)
        self.table = table
        if self.config.snapshots > 0:
            self.snapshots.append(table)
        return table
