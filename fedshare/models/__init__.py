"""Recommendation models: client-side ego-graph LightGCN, server/central LightGCN, MF."""

CENTRAL_MODELS = ("popularity", "mf", "lightgcn")
"""The centralised references of :mod:`fedshare.central` (named here, so that listing them, as
the CLI's parser does, imports no model code)."""
