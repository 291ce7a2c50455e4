"""DeepSpeed ZeRO detection, without importing deepspeed (the public names are re-exported by
``znorm_kernels.integrations.deepspeed``).

ZeRO (stages 1-3) and DeepSpeed's fp16/bf16 master-weight optimizers flatten each param group and hand the
wrapped torch optimizer one flat fp32 partition per group (``param_group["params"] = [flat_partition]``),
whose gradient is a slice of the concatenation of many parameters' gradients on this rank. Per-tensor ZNorm
has no meaning there: z-scoring the partition would mix every tensor's statistics (and differ per world size),
so ``register`` and the callbacks refuse it instead of silently computing something else.

Identified by class (anywhere in the MRO, module under ``deepspeed``): ``DeepSpeedZeroOptimizer`` (stages
1-2, deepspeed.runtime.zero.stage_1_and_2), ``DeepSpeedZeroOptimizer_Stage3`` (deepspeed.runtime.zero.stage3),
their base ``ZeROOptimizer``, ``BF16_Optimizer`` and the fused ``FP16_Optimizer``; an engine
(``DeepSpeedEngine``) with ``zero_optimization_stage() > 0``; wrappers (Lightning's ``LightningOptimizer``,
accelerate's ``AcceleratedOptimizer`` / ``DeepSpeedOptimizerWrapper``) are looked through; and by attribute:
ZeRO-3 sets ``ds_id`` on its flat fp32 partitions and ``ds_id`` / ``ds_tensor`` on partitioned parameters, so
an ordinary torch optimizer holding such tensors is refused too. Not detectable: a plain torch optimizer on
which ``register`` ran *before* ``deepspeed.initialize`` rewrote its param groups (stages 1-2 set no attribute
on the flat partition): register after initialize, on what it returns, so the check sees the ZeRO optimizer.
"""

from __future__ import annotations

__all__ = ["check_not_deepspeed_zero", "deepspeed_zero_reason"]

_FLATTENING_CLASSES = frozenset(
    {
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
        "ZeROOptimizer",
        "BF16_Optimizer",
        "FP16_Optimizer",
    }
)
_ZERO3_PARAM_ATTRS = ("ds_id", "ds_tensor")
_INNER = ("_optimizer", "optimizer")  # LightningOptimizer, AcceleratedOptimizer, DeepSpeed's own wrappers

_ALTERNATIVE = (
    "ZNorm needs each parameter's whole gradient. Normalize before DeepSpeed flattens it: train with DDP "
    "(torch.nn.parallel.DistributedDataParallel) and znorm_kernels.register(optimizer), or with the "
    "Lightning / Hugging Face callbacks (znorm_kernels.integrations) under a DDP strategy instead of "
    "DeepSpeed; within DeepSpeed only ZeRO stage 0 in fp32 or torch autocast (no fp16/bf16 master-weight "
    "optimizer) keeps per-parameter gradients."
)


def _deepspeed_class(obj) -> str | None:
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if cls.__name__ in _FLATTENING_CLASSES and module.split(".")[0] == "deepspeed":
            return f"{module}.{cls.__name__}"
    return None


def _is_engine(obj) -> bool:
    return any(
        cls.__name__ == "DeepSpeedEngine" and (cls.__module__ or "").split(".")[0] == "deepspeed"
        for cls in type(obj).__mro__
    )


def deepspeed_zero_reason(obj) -> str | None:
    """Why ``obj`` (an optimizer, a wrapper of one, or a DeepSpeed engine) feeds per-group flat partitions
    rather than per-parameter gradients, or None when it does not."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        name = _deepspeed_class(obj)
        if name is not None:
            return f"it is (or wraps) a DeepSpeed {name}, which flattens each param group into one partition"
        if _is_engine(obj):
            stage_of = getattr(obj, "zero_optimization_stage", None)
            stage = stage_of() if callable(stage_of) else None
            if stage:
                return f"it is a DeepSpeed engine with ZeRO stage {stage}"
        for group in getattr(obj, "param_groups", None) or ():
            for p in group.get("params", ()) if isinstance(group, dict) else ():
                attr = next((a for a in _ZERO3_PARAM_ATTRS if hasattr(p, a)), None)
                if attr is not None:
                    return (
                        f"its param groups hold DeepSpeed ZeRO-3 tensors (attribute {attr!r}: partitioned "
                        "parameters or flat fp32 partitions)"
                    )
        obj = next((getattr(obj, a) for a in _INNER if getattr(obj, a, None) is not None), None)
    return None


def check_not_deepspeed_zero(optimizer) -> None:
    """Raise a RuntimeError if ``optimizer`` is a DeepSpeed ZeRO (or flattening) optimizer or engine, on
    which per-tensor ZNorm would silently normalize flat partitions; do nothing otherwise. Never imports
    deepspeed."""
    reason = deepspeed_zero_reason(optimizer)
    if reason is not None:
        raise RuntimeError(
            f"znorm_kernels: cannot run ZNorm on {type(optimizer).__name__}: {reason}, so the gradients it "
            f"steps on are flat slices of many parameters, not per-parameter tensors. {_ALTERNATIVE}"
        )
