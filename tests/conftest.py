"""Test session set-up: without a GPU, Triton kernels run on the CPU through its interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined (the backend module is imported lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_plans(monkeypatch):
    """triton_plan with its caches (plans, table layouts, pooled workspaces) empty for the test, and put back
    after."""
    from znorm_kernels.backends import triton_plan

    for name in ("plans", "layouts", "workspace_pool"):
        monkeypatch.setattr(triton_plan, name, type(getattr(triton_plan, name))())
    return triton_plan
