"""Fully sharded data parallelism: parameters, gradients and optimizer state split over an
`fsdp` axis (each on its largest divisible dimension), the batch split over the same axis.

XLA gathers a parameter where it is used and reduce-scatters its gradient; nothing is
hand-written. Small parameters (below `min_shard_bytes`) stay replicated.
"""

from __future__ import annotations

from meshfit.strategies.hybrid import DEFAULT_MIN_SHARD_BYTES, Hybrid


class FSDP(Hybrid):
    """Every parameter and its optimizer state sharded along one `fsdp` mesh axis.

    Args:
        min_shard_bytes: parameters smaller than this stay replicated (default 4 KiB).

    Annotations from `nnx.with_partitioning` are ignored (use `Hybrid` for tensor parallelism).
    """

    name = "fsdp"
    use_annotations = False

    def __init__(self, min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES):
        super().__init__(fsdp=-1, min_shard_bytes=min_shard_bytes)

    @property
    def num_replicas(self) -> int:
        """One copy of the model, split over all devices."""
        return 1

    def __repr__(self) -> str:
        return f"FSDP(min_shard_bytes={self.min_shard_bytes})"
