"""Optimizers with ZNorm built into their step: ``ZNormSGD``, ``ZNormAdam`` and ``ZNormAdamW``.

Drop-in replacements for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (same arguments, same param groups and
``state_dict`` format, so checkpoints move between them and torch's), plus ``znorm_eps``, ``correction``,
``min_ndim`` and ``backend``; each step uses the z-scores of the gradients, exactly as
``znorm_kernels.register(torch_optimizer)`` would, but leaves ``.grad`` itself untouched unless
``normalize_grad=True``. Param groups take ``znorm`` (False: plain update) and ``min_ndim`` per group.
"""

from .adam import ZNormAdam, ZNormAdamW
from .base import ZNormOptimizer
from .sgd import ZNormSGD

__all__ = ["ZNormAdam", "ZNormAdamW", "ZNormOptimizer", "ZNormSGD"]
