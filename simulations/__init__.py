"""Runnable experiments, their configs (``simulations/configs``) and report writers."""
