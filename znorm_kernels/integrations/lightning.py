"""PyTorch Lightning: ``ZNormCallback`` runs ZNorm on every optimizer step
(``pip install znorm_kernels[lightning]``).

    from znorm_kernels.integrations.lightning import ZNormCallback
    trainer = lightning.Trainer(callbacks=[ZNormCallback()])

It uses ``on_before_optimizer_step``, which Lightning calls once per optimizer step (after
``accumulate_grad_batches`` micro-batches), after AMP unscaling, and *before* its own gradient clipping: with
``gradient_clip_val`` set, Lightning clips the z-scores (by norm: every tensor z-scored has norm sqrt(n), so
norm clipping then mostly rescales the whole update). Lightning refuses gradient clipping with optimizers
that unscale inside their own step (``fused=True``) under 16-bit AMP; there the callback sees gradients still
scaled by the GradScaler and keeps them scaled (s * z-scores), so the fused step's own unscaling yields the
z-scores, as ``znorm_kernels.register`` does. DeepSpeed ZeRO strategies are refused (see
``integrations.deepspeed``).
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from .applier import ZNormApplier

__all__ = ["ZNormCallback"]


class ZNormCallback(Callback):
    """ZNorm on the gradients of each optimizer's parameters, just before Lightning's optimizer step.

    Args:
        eps, correction, backend: as for ``znorm_kernels.znorm_``.
        min_ndim: only parameters with at least this many dimensions (2 leaves biases and norm weights alone).
    """

    def __init__(self, eps: float = 1e-10, correction: float = 0, backend: str = "auto", min_ndim: int = 1):
        super().__init__()
        self._apply = ZNormApplier(eps, correction, backend, min_ndim)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._apply(optimizer, pl_module, scaler)
