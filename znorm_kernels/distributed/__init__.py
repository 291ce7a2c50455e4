"""ZNorm under torch.distributed: DTensor gradients (FSDP2's ``fully_shard``, tensor parallelism).

``znorm_kernels.znorm_`` and ``znorm_kernels.register`` route DTensor entries here by themselves; call
``znorm_dtensors_`` directly only to normalize DTensors alone. DDP needs nothing from this package: its
gradients are plain tensors, already averaged over ranks when the optimizer steps.
"""

from .dtensor import local_statistics, merge_statistics, shard_statistics, znorm_dtensors_

__all__ = ["local_statistics", "merge_statistics", "shard_statistics", "znorm_dtensors_"]
