"""megatron_ghpo: GHPO (Guided Hybrid Policy Optimization) reinforcement learning on Megatron-Core."""

__version__ = "0.1.0"
