"""Where DTensors sit in a list of gradients, without importing torch.distributed.

A DTensor's statistics span ranks, so the dispatcher, the hook's cache and the fused optimizer step route
DTensor entries elsewhere (``znorm_kernels.distributed``). DTensors exist only once
``torch.distributed.tensor`` is imported: until then the check costs one dict look-up, and after it one set
of types per call.
"""

from __future__ import annotations

import sys

__all__ = ["dtensor_positions", "dtensors_possible"]

_DTENSOR_MODULE = "torch.distributed.tensor"


def dtensors_possible() -> bool:
    """Whether this process has imported DTensor (so a list may hold one)."""
    return _DTENSOR_MODULE in sys.modules


def dtensor_positions(items: list) -> list[int] | None:
    """The positions of DTensor entries in ``items``, or None when there are none."""
    dtensor = getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)
    if dtensor is None or not any(issubclass(k, dtensor) for k in set(map(type, items))):
        return None
    return [i for i, t in enumerate(items) if isinstance(t, dtensor)]
