"""znorm_kernels: Z-score gradient normalization (ZNorm) for PyTorch.

    import znorm_kernels
    znorm_kernels.register(optimizer)      # every optimizer.step() now sees z-scored gradients

``znorm_(tensors)`` normalizes a list of tensors in place; ``available_backends()`` lists the backends this
process can use; ``reference`` is the pure-PyTorch oracle. The papers' baselines are here too: gradient
centralization (``gc_``, ``register_gc``) and gradient-norm clipping (``clip_grad_norm_``, ``register_clip``).
What it computes and promises, rule by rule: docs/contract.md.
"""

from . import reference
from .api import available_backends, znorm_
from .baselines import clip_grad_norm_, gc_, register_clip, register_gc
from .hook import register
from .version import __version__

__all__ = [
    "__version__",
    "available_backends",
    "clip_grad_norm_",
    "gc_",
    "reference",
    "register",
    "register_clip",
    "register_gc",
    "znorm_",
]
