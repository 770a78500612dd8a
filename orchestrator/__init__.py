"""orch: a sharded multi-process orchestrator."""

__version__ = "0.1.0"
