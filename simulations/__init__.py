"""Launchers: the ``fedshare`` command (``cli``), runs in either engine, the local Flower
simulation and the TLS deployment, the tables and the benchmark. Nothing imports this package
back (an import-linter contract)."""
