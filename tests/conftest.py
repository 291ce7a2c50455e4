"""Test session set-up: without a GPU, Triton kernels run on the CPU through its interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined (the backend module is imported lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
