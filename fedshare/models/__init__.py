"""Recommendation models: client-side ego-graph LightGCN, server/central LightGCN, MF."""
