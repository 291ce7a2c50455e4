"""Hugging Face transformers: ``ZNormTrainerCallback`` runs ZNorm on every optimizer step of a ``Trainer``
(``pip install znorm_kernels[hf]``).

    from znorm_kernels.integrations.hf import ZNormTrainerCallback
    trainer = transformers.Trainer(..., callbacks=[ZNormTrainerCallback()])

It uses ``on_pre_optimizer_step`` (transformers >= 4.46), which the Trainer calls once per optimizer step
(after ``gradient_accumulation_steps`` micro-batches) *after* gradient clipping: ZNorm then undoes
``max_grad_norm`` clipping for every tensor of 2 or more elements (z-scores do not depend on the gradient's
scale), so set ``max_grad_norm=0`` to skip the wasted clipping. Under fp16 (a GradScaler) the Trainer unscales
when it clips or takes the gradient norm; where the gradients reach the callback still scaled, it unscales
them first through the scaler, as ``accelerator.unscale_gradients`` does, so the following ``scaler.step``
neither unscales twice nor misses the inf/NaN check (non-finite gradients stay non-finite, and the step is
skipped). With a fused optimizer it keeps them scaled instead (s * z-scores), as ``znorm_kernels.register``
does. DeepSpeed is refused: there the engine steps inside ``backward``, before this callback, on flat
partitions.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .applier import ZNormApplier

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
    import transformers

    raise ImportError(
        f"ZNormTrainerCallback needs TrainerCallback.on_pre_optimizer_step, which transformers "
        f"{transformers.__version__} lacks: upgrade transformers (pip install -U 'znorm_kernels[hf]')"
    )

__all__ = ["ZNormTrainerCallback"]


def _is_deepspeed_wrapper(optimizer) -> bool:
    return any(c.__name__ == "DeepSpeedOptimizerWrapper" for c in type(optimizer).__mro__)


class ZNormTrainerCallback(TrainerCallback):
    """ZNorm on the gradients of the parameters the Trainer's optimizer updates, just before its step.

    Args:
        eps, correction, backend: as for ``znorm_kernels.znorm_``.
        min_ndim: only parameters with at least this many dimensions (2 leaves biases and norm weights alone).
    """

    def __init__(self, eps: float = 1e-10, correction: float = 0, backend: str = "auto", min_ndim: int = 1):
        self._apply = ZNormApplier(eps, correction, backend, min_ndim)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if optimizer is None:
            raise RuntimeError(
                "ZNormTrainerCallback: the Trainer passed no optimizer to on_pre_optimizer_step"
            )
        if _is_deepspeed_wrapper(optimizer):
            raise RuntimeError(
                "ZNormTrainerCallback does not work under DeepSpeed: the DeepSpeed engine steps inside "
                "backward, before on_pre_optimizer_step, on flat partitions of the gradients. Train with DDP "
                "(no deepspeed config) and this callback, or znorm_kernels.register(optimizer)."
            )
        # accelerate's AcceleratedOptimizer carries the GradScaler under fp16 (None otherwise).
        self._apply(optimizer, model, getattr(optimizer, "scaler", None))
        return control
