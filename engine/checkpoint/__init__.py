"""Checkpoints: the on-disk format, saving, finding, restoring, and preemption."""
