"""Planner pieces: how TorchRec's sharding planner sees our tables."""
