"""What a ZNorm optimizer hands its fused step: its ZNorm settings, and the caches the fused step keeps for
it between steps (each dropped when the optimizer's state is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FusedCaches", "ZNormSettings"]

# Param-group keys of the ZNorm options (the optimizer's own arguments set their defaults).
GROUP_KEYS = ("znorm", "min_ndim", "znorm_eps", "correction")


@dataclass
class ZNormSettings:
    defaults: dict[str, Any]  # a value for each of GROUP_KEYS
    backend: str
    normalize_grad: bool
    track_stats: bool

    def option(self, group: dict[str, Any], key: str) -> Any:
        """A param group's value of one of GROUP_KEYS (the optimizer's default where the group has none)."""
        return group.get(key, self.defaults[key])


@dataclass
class FusedCaches:
    layouts: dict[int, Any] = field(default_factory=dict)  # id(group) -> fused_layout.FusedLayout
    remembered: dict[int, Any] = field(default_factory=dict)  # id(group) -> remembered.Remembered
    validated: dict[tuple, Any] = field(default_factory=dict)  # lists the kernels' checks have passed
