"""DeepSpeed ZeRO: not supported, and refused with a clear error (``check_not_deepspeed_zero``).

``register`` and the callbacks call the check themselves; it is public here for code that wants to fail
early. The detection lives in ``znorm_kernels.deepspeed_zero``, which never imports deepspeed.
"""

from ..deepspeed_zero import check_not_deepspeed_zero, deepspeed_zero_reason

__all__ = ["check_not_deepspeed_zero", "deepspeed_zero_reason"]
