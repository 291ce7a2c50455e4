"""Which tensor types the library's fast paths take as plain: ``torch.Tensor`` and ``nn.Parameter``, which
have no ``__torch_function__`` of their own (a subclass's would see every torch call on its instances, and
torch swaps subclass parameters where it would assign plain ones). The checks' fast path, the native
backend's bound lists and the hook's native steady step all ask it. This module imports nothing of the
package."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PLAIN_TYPES"]

PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))
