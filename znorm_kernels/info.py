"""``python -m znorm_kernels``: a diagnosis of this installation, to paste into a bug report.

It prints, in order:

- versions: znorm_kernels, Python, torch (and the CUDA it was built with), Triton, NumPy, the platform;
- devices: the CUDA devices torch sees (name, compute capability, memory), or none;
- backends: each of ``registry.BACKENDS``, available or not and why (the library's own reasons), and what
  backend="auto" picks on each device present;
- the native extension ``znorm_kernels._C``: its path, whether it holds the CUDA kernel and the fused
  optimizer kernels, and the CUDA architectures it was compiled for (``cuda_archs``; "unknown" when the .so
  does not say);
- the environment switches that matter (TRITON_INTERPRET, CUDA_VISIBLE_DEVICES, every ZNORM_* variable);
- a self-check: every available backend, on every device it serves, normalizes a few small random tensors
  (float32 and bfloat16); the results are compared with the float64 z-scores of the same values and pass
  within contract rule 10's bound (``znorm_kernels.accuracy``). The Triton interpreter on the CPU is checked
  only when TRITON_INTERPRET=1 is already set.

``--json`` prints the same as one JSON object (``SCHEMA_VERSION``). The exit status is 0 when every available
backend passes its self-check, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import registry
from .accuracy import z_error, z_float64
from .api import znorm_
from .backends import native, triton_interpret
from .cuda_archs import cuda_archs
from .version import __version__

__all__ = [
    "CHECK_DTYPES",
    "CHECK_SHAPES",
    "SCHEMA_VERSION",
    "collect",
    "format_text",
    "main",
    "self_check",
]

SCHEMA_VERSION = 1
CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((2,), (257,), (64, 33), (16, 3, 3, 3), (5000,))
CHECK_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
CHECK_EPS = 1e-10
INTERPRETER_SKIP = "the Triton interpreter runs CPU tensors only when TRITON_INTERPRET=1 is set"

# --------------------------------------------------------------------------------------------- sections


def _version(dist: str, module: str | None = None) -> str | None:
    """A distribution's version without importing it (None when not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        mod = sys.modules.get(module or dist)
        return getattr(mod, "__version__", None) if mod is not None else None


def versions() -> dict[str, Any]:
    return {
        "znorm_kernels": __version__,
        "znorm_kernels_path": str(Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "triton": _version("triton") or _version("pytorch-triton", "triton"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
    }


def devices() -> dict[str, Any]:
    out: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda": [], "error": None}
    if not out["cuda_available"]:
        return out
    try:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["cuda"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "total_memory_bytes": int(p.total_memory),
                    "multi_processor_count": int(p.multi_processor_count),
                }
            )
    except Exception as err:  # a broken driver is exactly what a bug report needs to show
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def _device_types(dev: dict[str, Any]) -> list[str]:
    return ["cpu", *(["cuda"] if dev["cuda"] else [])]


def backends(dev: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for name in registry.BACKENDS:
        reason = registry.unavailable(name)
        rows.append({"name": name, "available": reason is None, "reason": reason})
    auto: dict[str, str] = {}
    for device_type in _device_types(dev):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning: the table above already says why
            try:
                auto[device_type] = registry.resolve_backend("auto", device_type)
            except Exception as err:
                auto[device_type] = f"error: {type(err).__name__}: {err}"
    return {"backends": rows, "auto": auto}


def extension() -> dict[str, Any]:
    module, why = native.loaded()
    out: dict[str, Any] = {
        "built": module is not None,
        "reason": why,
        "path": None,
        "cuda_kernel": False,
        "cuda_archs": None,
        "cuda_archs_source": "unknown",
        "optim_kernels": {"cpu": False, "cuda": False},
    }
    if module is None:
        return out
    path = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    out["path"] = str(path) if path else None
    out["cuda_kernel"] = native.has_cuda_kernel()
    out["optim_kernels"] = {d: native.has_optim_kernels(d) for d in ("cpu", "cuda")}
    if out["cuda_kernel"] and path is not None:
        out["cuda_archs"], out["cuda_archs_source"] = cuda_archs(path)
    return out


def _arch_warnings(ext: dict[str, Any], dev: dict[str, Any]) -> list[str]:
    """Devices the extension's CUDA kernel has no code for (no cubin of that major version, no PTX to JIT)."""
    archs = ext.get("cuda_archs")
    if not ext.get("cuda_kernel") or not archs:
        return []
    out = []
    for d in dev["cuda"]:
        major, minor = (int(x) for x in d["capability"].split("."))
        ok = False
        for a in archs:
            m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", a)
            if m is None:
                continue
            a_major, a_minor = int(m.group(2)), int(m.group(3))
            if m.group(1) == "sm" and a_major == major and a_minor <= minor and not m.group(4):
                ok = True
            if m.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
                ok = True
        if not ok:
            held = ", ".join(archs)
            out.append(f"cuda:{d['index']} is sm_{major}{minor}; the extension holds code for {held} only")
    return out


def environment() -> dict[str, str | None]:
    env: dict[str, str | None] = {
        name: os.environ.get(name) for name in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "CUDA_HOME")
    }
    for name in sorted(os.environ):
        if name.startswith("ZNORM_"):
            env[name] = os.environ[name]
    return env


# --------------------------------------------------------------------------------------------- self-check


def _inputs(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(CHECK_SHAPES):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * (10.0 ** (i - 2)) + (i - 1)
        out.append(t)
    out[-1][7] = 50.0  # an outlier: a z-score beyond 10, where the bound turns relative
    return out


def _check_one(backend: str, device: str, dtype: torch.dtype, inputs: list[Tensor]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": backend,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "status": "fail",
        "max_error": None,
        "max_excess": None,
        "seconds": None,
        "error": None,
    }
    start = time.perf_counter()
    try:
        tensors = [x.to(dtype).to(device) for x in inputs]
        expected = [z_float64(t, CHECK_EPS) for t in tensors]
        znorm_(tensors, eps=CHECK_EPS, backend=backend)
        row["max_error"], row["max_excess"] = z_error(tensors, expected)
        row["status"] = "pass" if row["max_excess"] <= 0 else "fail"
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
    row["seconds"] = round(time.perf_counter() - start, 4)
    return row


def self_check(dev: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every available backend on every device it serves, against the float64 z-scores of its input."""
    dev = devices() if dev is None else dev
    device_names = ["cpu", *(f"cuda:{d['index']}" for d in dev["cuda"])]
    inputs = _inputs()
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, backend in registry.BACKENDS.items():
        if name == "triton" and not triton_interpret() and importlib.util.find_spec("triton") is not None:
            rows.append({"backend": name, "device": "cpu", "status": "skipped", "note": INTERPRETER_SKIP})
        if registry.unavailable(name) is not None:
            continue
        for device in device_names:
            if backend.serves(torch.device(device)) is not None:
                continue
            for dtype in CHECK_DTYPES:
                rows.append(_check_one(name, device, dtype, inputs))
    return {
        "rule": "contract rule 10 (znorm_kernels.accuracy): 1e-5 abs up to |z|=10, 1e-6 rel beyond, "
        "+1/2 ulp for 16-bit",
        "eps": CHECK_EPS,
        "shapes": [list(s) for s in CHECK_SHAPES],
        "dtypes": [str(d).removeprefix("torch.") for d in CHECK_DTYPES],
        "triton_interpreter": triton_interpret(),
        "results": rows,
        "seconds": round(time.perf_counter() - start, 3),
        "ok": all(r["status"] != "fail" for r in rows),
    }


# --------------------------------------------------------------------------------------------- report


def collect(run_check: bool = True) -> dict[str, Any]:
    """The whole diagnosis as a JSON-serializable dict (``--json`` prints it)."""
    dev = devices()
    ext = extension()
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(),
        "devices": dev,
        **backends(dev),
        "extension": ext,
        "warnings": _arch_warnings(ext, dev),
        "environment": environment(),
        "self_check": self_check(dev) if run_check else None,
    }
    report["ok"] = report["self_check"]["ok"] if run_check else True
    return report


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_text(r: dict[str, Any]) -> str:
    """The diagnosis as the plain text ``python -m znorm_kernels`` prints."""
    lines = ["znorm_kernels diagnosis (python -m znorm_kernels; paste all of it into a bug report)", ""]
    v = r["versions"]
    torch_cuda = f"CUDA {v['torch_cuda']}" if v["torch_cuda"] else "no CUDA"
    if v.get("torch_hip"):
        torch_cuda += f", HIP {v['torch_hip']}"
    lines += [
        "Versions",
        f"  znorm_kernels  {v['znorm_kernels']}  ({v['znorm_kernels_path']})",
        f"  python         {v['python']}  ({v['python_executable']})",
        f"  torch          {v['torch']}  ({torch_cuda})",
        f"  triton         {v['triton'] or 'not installed'}",
        f"  numpy          {v['numpy'] or 'not installed'}",
        f"  platform       {v['platform']}",
        "",
        "Devices",
        "  cpu",
    ]
    d = r["devices"]
    for c in d["cuda"]:
        cap = c["capability"].replace(".", "")
        lines.append(
            f"  cuda:{c['index']}  {c['name']}, sm_{cap}, {_gib(c['total_memory_bytes'])}, "
            f"{c['multi_processor_count']} SMs"
        )
    if not d["cuda"]:
        why = "" if d["cuda_available"] else " (torch.cuda.is_available() is False)"
        lines.append(f"  no CUDA device{why}")
    if d["error"]:
        lines.append(f"  error reading CUDA devices: {d['error']}")
    lines += ["", "Backends"]
    for b in r["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {b['name']:<10} {state}")
    lines.append("  auto       " + ", ".join(f"{k} -> {v}" for k, v in r["auto"].items()))
    e = r["extension"]
    lines += ["", "Extension znorm_kernels._C"]
    if e["built"]:
        archs = ", ".join(e["cuda_archs"]) if e["cuda_archs"] else "unknown"
        optim = ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in e["optim_kernels"].items())
        lines += [
            f"  path           {e['path']}",
            f"  CUDA kernel    {'yes' if e['cuda_kernel'] else 'no (built for the CPU only)'}",
        ]
        if e["cuda_kernel"]:
            lines.append(f"  CUDA archs     {archs}  (from {e['cuda_archs_source']})")
        lines.append(f"  fused optim    {optim}")
    else:
        lines.append(f"  not loaded: {e['reason']}")
    for w in r["warnings"]:
        lines.append(f"  WARNING: {w}")
    lines += ["", "Environment"]
    for k, val in r["environment"].items():
        lines.append(f"  {k:<22} {'(unset)' if val is None else val}")
    if not any(k.startswith("ZNORM_") for k in r["environment"]):
        lines.append(f"  {'ZNORM_*':<22} (none set)")
    s = r["self_check"]
    if s is not None:
        shapes = ", ".join("x".join(map(str, sh)) for sh in s["shapes"])
        lines += [
            "",
            f"Self-check: shapes {shapes}; {', '.join(s['dtypes'])}; against float64 z-scores",
            f"  bound: {s['rule']}",
        ]
        for row in s["results"]:
            head = f"  {row['backend']:<10} {row['device']:<7}"
            if row["status"] == "skipped":
                lines.append(f"{head} skipped: {row['note']}")
                continue
            head += f" {row['dtype']:<9}"
            if row["error"]:
                lines.append(f"{head} FAIL  {row['error']}")
                continue
            verdict = "pass" if row["status"] == "pass" else "FAIL"
            lines.append(
                f"{head} max error {row['max_error']:.2e}  (margin to the bound {-row['max_excess']:.1e})  "
                f"{verdict}  {row['seconds'] * 1e3:.0f} ms"
            )
        verdict = "OK: every available backend passes" if s["ok"] else "FAILED: see the FAIL lines above"
        lines += ["", f"Result: {verdict} ({s['seconds']:.2f} s)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m znorm_kernels",
        description="Diagnose this znorm_kernels installation: versions, devices, backends, the native "
        "extension's build, environment switches, and a self-check of every available backend.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-check", action="store_true", help="skip the self-check (exit status 0)")
    args = parser.parse_args(argv)
    report = collect(run_check=not args.no_check)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_text(report))
    return 0 if report["ok"] else 1
