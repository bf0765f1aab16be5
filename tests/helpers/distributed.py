"""The multiprocess helper of the distributed tests: ``parallel.spawn`` (also used by
``moe.trainer.memory``); re-exported here so tests keep importing it from their helpers."""
from parallel.spawn import DistributedTestError, free_port, run_distributed

__all__ = ["DistributedTestError", "free_port", "run_distributed"]
