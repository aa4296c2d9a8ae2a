"""GRU4Rec and SASRec backbones behind one interface (CAU paper Sec. 5.1.3, spec "Backbones").

Both take left-padded ``[B, L]`` item ids (pad 0) and return hidden states ``[B, L, d]`` in which
position t depends only on items at positions <= t (causal) and not on how much padding precedes
the session (pad-invariant: a prefix alone, left-padded, gets the same state as inside its window).
Hidden states at pad positions are zero. ``scores`` turns states into full-softmax logits over
``0..n`` with the pad's logit at -inf.

The *last layer* (for CAU's last-layer gradient difficulty, spec "Difficulty") is the output
projection that makes the logits: ``logits = h @ W.T (+ b)``. Its gradient for one sample is the
outer product of (softmax - target) with h, so the cosine between two such gradients of the same
sample equals the cosine of their logit gradients. ``last_layer`` names these parameters:
GRU4Rec's untied ``output`` Linear (spec: "untied Linear output"); SASRec's item embedding,
which is tied to the output (as in SASRec) and therefore is also its input table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedshare.sequences.data import PAD


def _left_aligned_positions(sequences: Tensor) -> Tensor:
    """Position of each item counted from the session's first real item (pads get 0)."""
    real = (sequences != PAD).long()
    return ((real.cumsum(1) - 1) * real).clamp(min=0)


class SequenceModel(nn.Module):
    """Shared part of the backbones: the pad-masked full-softmax head."""

    num_items: int
    last_layer: tuple[str, ...]

    def output_weight(self) -> Tensor:
        """``[n + 1, d]``: row i scores item i."""
        raise NotImplementedError

    def output_bias(self) -> Tensor | None:
        return None

    @property
    def item_embeddings(self) -> Tensor:
        """``[n + 1, d]`` input item embeddings (row 0 is the pad)."""
        raise NotImplementedError

    def last_layer_parameters(self) -> list[nn.Parameter]:
        named = dict(self.named_parameters())
        return [named[name] for name in self.last_layer]

    def scores(self, hidden: Tensor) -> Tensor:
        """``[..., n + 1]`` logits; the pad (index 0) is -inf so it is never ranked or predicted."""
        logits = hidden @ self.output_weight().T
        bias = self.output_bias()
        if bias is not None:
            logits = logits + bias
        return logits.index_fill(-1, torch.tensor([PAD], device=logits.device), float("-inf"))


class SASRec(SequenceModel):
    """Self-attentive next-item model (Kang & McAuley 2018): learned positions, pre-norm causal
    self-attention blocks, output tied to the item embeddings."""

    def __init__(self, num_items: int, max_len: int = 50, dim: int = 64, blocks: int = 2,
                 heads: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.last_layer = ("item_embedding.weight",)
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.attention_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
            for _ in range(blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.ffns = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(dim, dim), nn.Dropout(dropout))
            for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim)
        self.heads = heads
        nn.init.normal_(self.item_embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[PAD].zero_()

    @property
    def item_embeddings(self) -> Tensor:
        return self.item_embedding.weight

    def output_weight(self) -> Tensor:
        return self.item_embedding.weight

    def forward(self, sequences: Tensor) -> Tensor:
        length = sequences.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        real = sequences != PAD
        x = self.item_embedding(sequences) * self.item_embedding.embedding_dim ** 0.5
        x = self.dropout(x + self.position_embedding(_left_aligned_positions(sequences)))
        x = x * real.unsqueeze(-1)
        # blocked[b, q, k]: query q may not see key k (a later position or a pad); a query may
        # always see itself so that pad rows never have all keys blocked (no NaN).
        later = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        blocked = later | ~real.unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=x.device)
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        for norm, attention, ffn_norm, ffn in zip(self.attention_norms, self.attentions,
                                                  self.ffn_norms, self.ffns, strict=True):
            q = norm(x)
            x = x + attention(q, q, q, attn_mask=blocked, need_weights=False)[0]
            x = x + ffn(ffn_norm(x))
            x = x * real.unsqueeze(-1)
        return self.final_norm(x) * real.unsqueeze(-1)


class GRU4Rec(SequenceModel):
    """Recurrent next-item model (Hidasi et al. 2016): item embedding, one GRU layer, untied
    Linear output (``tied=True`` scores with the input embeddings instead)."""

    def __init__(self, num_items: int, dim: int = 64, hidden: int | None = None,
                 layers: int = 1, dropout: float = 0.2, tied: bool = False) -> None:
        super().__init__()
        hidden = dim if hidden is None else hidden
        if tied and hidden != dim:
            raise ValueError("a tied output needs hidden == dim")
        self.num_items, self.tied = num_items, tied
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=PAD)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, num_layers=layers, batch_first=True)
        self.output = None if tied else nn.Linear(hidden, num_items + 1)
        self.last_layer = (("item_embedding.weight",) if tied
                           else ("output.weight", "output.bias"))

    @property
    def item_embeddings(self) -> Tensor:
        return self.item_embedding.weight

    def output_weight(self) -> Tensor:
        return self.item_embedding.weight if self.output is None else self.output.weight

    def output_bias(self) -> Tensor | None:
        return None if self.output is None else self.output.bias

    def forward(self, sequences: Tensor) -> Tensor:
        # Rotate each row so that its items come first and its pads last: the GRU then never
        # sees a pad before an item (pad-invariant), and rotating back restores the positions.
        length = sequences.shape[1]
        real = sequences != PAD
        shift = (~real).sum(1, keepdim=True)
        index = torch.arange(length, device=sequences.device).unsqueeze(0)
        front = sequences.gather(1, (index + shift) % length)
        states, _ = self.gru(self.dropout(self.item_embedding(front)))
        back = ((index - shift) % length).unsqueeze(-1).expand(-1, -1, states.shape[-1])
        return states.gather(1, back) * real.unsqueeze(-1)
