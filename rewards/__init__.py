"""Reward functions for GRPO (phase 2)."""
