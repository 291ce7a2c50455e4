"""Framework integrations of ZNorm. Importing this package imports no framework; import the submodule you use:

    from znorm_kernels.integrations.lightning import ZNormCallback      # pip install znorm_kernels[lightning]
    from znorm_kernels.integrations.hf import ZNormTrainerCallback      # pip install znorm_kernels[hf]
    from znorm_kernels.integrations.deepspeed import check_not_deepspeed_zero

Where each runs, against loss scaling and gradient clipping:

- Lightning (``on_before_optimizer_step``): after AMP unscaling and gradient accumulation, *before*
  Lightning's own gradient clipping, so ``gradient_clip_val`` clips the z-scores. With a fused optimizer
  Lightning does not unscale (and refuses clipping); the callback then keeps the gradients scaled, as
  ``register`` does.
- Hugging Face ``Trainer`` (``on_pre_optimizer_step``): *after* gradient clipping, so ZNorm undoes
  ``max_grad_norm`` for every multi-element tensor (set ``max_grad_norm=0`` to skip the wasted work). Under
  fp16 the gradients there are unscaled whenever the Trainer clipped or took the gradient norm; where they are
  still loss-scaled, the callback unscales them first through the GradScaler, as
  ``accelerator.unscale_gradients`` does, so the following ``scaler.step`` does not unscale twice.
- DeepSpeed ZeRO: not supported (flat partitions per param group); ``check_not_deepspeed_zero`` says so.
"""

__all__: list[str] = []
