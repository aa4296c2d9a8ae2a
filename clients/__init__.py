"""Flower ClientApps (Message API) that run ``fedshare``'s local training on a node."""
