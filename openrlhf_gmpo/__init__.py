"""GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673) for OpenRLHF, with MoE recipes."""

__version__ = "0.1.0"
