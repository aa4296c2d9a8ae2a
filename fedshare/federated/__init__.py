"""The federated learning phase (Sec. IV-B) without Flower: client cohorts, aggregation, the
server's refinement, one round (``rounds``) that both engines run, and the server's state
database. ``strategies/`` and ``clients/`` call these; ``inprocess`` runs them in one process as
the vectorised reference the Flower app is checked against."""
