"""Flower ServerApp strategies (``flwr.serverapp.strategy``) of FedShare and its baselines.

Strategies only orchestrate: the learning logic they call lives in the Flower-free ``fedshare``
core so that it is unit-tested directly.
"""
