"""Tiny GPTs, synthetic tasks and small trained checkpoints (safetensors) with the commands that made them."""
