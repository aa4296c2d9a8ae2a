"""The federated learning phase (Sec. IV-B) without Flower: client cohorts, aggregation and the
server's refinement. ``strategies/`` and ``clients/`` call these; ``simulate`` runs them in one
process as the vectorised reference the Flower app is checked against."""
