"""Inference engines, the multi-turn episode loop, rollout workers and weight sync."""
