"""An optional log of every reply the server receives, for privacy audits.

With ``audit-dir`` set in the run config, each reply's arrays and metrics are written to one
``.npz`` file, so a test (or an auditor) can check afterwards what reached the server.
"""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.common import log


class MessageAudit:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def record(self, kind: str, server_round: int, message: Message) -> None:
        """Write one reply; one that cannot be written is logged, never fatal."""
        if message.has_error():
            return
        try:
            self._write(kind, server_round, message)
        except Exception as exc:  # untrusted input
            log(WARNING, "audit: could not record a %s reply: %s", kind, exc)

    def _write(self, kind: str, server_round: int, message: Message) -> None:
        arrays: dict[str, np.ndarray] = {}
        for name, record in message.content.array_records.items():
            for key, value in record.items():
                arrays[f"{name}/{key}"] = value.numpy()
        metrics = {f"{name}/{k}": v for name, record in message.content.metric_records.items()
                   for k, v in record.items()}
        self._count += 1
        stem = f"{self._count:06d}-{kind}-r{server_round}-n{message.metadata.src_node_id}"
        np.savez(self.folder / f"{stem}.npz", **arrays)
        (self.folder / f"{stem}.json").write_text(json.dumps(metrics))
