"""Embedding tables as the paper initialises them (Sec. V-D: Xavier, d = 32)."""

from __future__ import annotations

import torch
from torch import Tensor


def xavier_table(rows: int, dim: int = 32, generator: torch.Generator | None = None) -> Tensor:
    """A ``[rows, dim]`` table drawn from Xavier's uniform distribution."""
    bound = (6.0 / (rows + dim)) ** 0.5
    return (torch.rand(rows, dim, generator=generator) * 2 - 1) * bound
