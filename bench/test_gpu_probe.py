"""The GPU probe's rehearsal on the CPU (bench/gpu_probe.py under TRITON_INTERPRET=1, timings meaningless):
the sweep runs end to end, a faulty variant is reported and not timed, each variant runs with its own tile
configuration, the Nsight Compute driver mode runs, and bench/gpu_profile.sh parses and prints its ncu
commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter (TRITON_INTERPRET must be set before the kernel module is imported). The block
# 2048 variant corrupts its output after the real launch: the probe must refuse to time it.
REHEARSAL = r"""
import json, sys
from znorm_kernels.backends import triton_host
from bench import gpu_probe

real_group = triton_host.znorm_group_

def faulty(tensors, *args, tiles=None, **kwargs):
    real_group(tensors, *args, tiles=tiles, **kwargs)
    if tiles is not None and tiles.block == 2048:
        tensors[0].mul_(2)

triton_host.znorm_group_ = faulty
rc = gpu_probe.main(sys.argv[1:])
triton_host.znorm_group_ = real_group
rc_ncu = gpu_probe.main(["--device", "cpu", "--ncu-target", "resnet8", "float32", "triton",
                         "--ncu-warmup", "1", "--ncu-calls", "1"])
print("RESULT", json.dumps({"rc": rc, "rc_ncu": rc_ncu}))
"""


def _interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run here (the probe calls the Triton host directly, past the
    backend's own availability check), or None."""
    from znorm_kernels.backends import triton_host

    try:
        return triton_host.interpreter_broken()
    except ImportError as err:  # pragma: no cover (no triton)
        return str(err)


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}


def _rehearse(script: str, out: Path, *knobs: str) -> dict:
    """Run ``script`` in a fresh interpreter (TRITON_INTERPRET=1) with the probe's arguments: a tiny CPU
    sweep of ResNet-8 in float32 into ``out``, with ``knobs`` (the blocks, unrolls, ...); its RESULT line."""
    argv = [
        "--device", "cpu", "--lists", "resnet8", "--dtypes", "float32", *knobs, "--per-sm", "1",
        "--programs=", "--reps", "1", "--max-seconds", "0", "--budget-s", "60", "--out", str(out),
    ]  # fmt: skip
    command = [sys.executable, "-c", script, *argv]
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.skipif(_interpreter_broken() is not None, reason=str(_interpreter_broken()))
def test_probe_rehearsal_refuses_a_faulty_variant(tmp_path: Path) -> None:
    result = _rehearse(REHEARSAL, tmp_path, "--blocks", "2048,4096", "--unrolls", "1,2")
    assert result == {"rc": 1, "rc_ncu": 0}  # rc 1: a check failed, the rest ran

    doc = json.loads((tmp_path / "gpu_probe.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) >= {
        "copy",
        "triton shipped",
        "triton b4096 u2 p2",
        "triton b4096 u1 p2",
        "triton b2048 u2 p2",
    }
    bad = rows["triton b2048 u2 p2"]
    assert bad["status"] == "FAILED CHECK" and bad["do_bench_us"] is None and bad["backlog_us"] is None
    for name in ("copy", "triton shipped", "triton b4096 u2 p2", "triton b4096 u1 p2"):
        assert rows[name]["status"] == "ok" and rows[name]["do_bench_us"] > 0, rows[name]
    assert (
        rows["triton b4096 u1 p2"]["unroll"] == 1 and doc["cases"]["resnet8 float32"]["shipped_unroll"] == 1
    )  # shipped: no tensor of ResNet-8 is above LARGE_TENSOR, so the list runs with UNROLL 1
    good = rows["triton b4096 u2 p2"]
    assert good["programs"] == 2 and good["extra"]["grid_seen"][0] == 2  # the variant's grid was launched
    assert good["max_err"] < 1e-5
    assert rows["triton shipped"]["programs"] == 1  # the CPU host runs one program
    md = (tmp_path / "gpu_probe.md").read_text()
    assert "| triton b2048 u2 p2 |" in md and "FAILED CHECK" in md


MID_CHUNKS = r"""
import json, sys
import torch
from znorm_kernels.backends import triton_plan
from znorm_kernels.backends.tiles import Tiles, ticket_runs, tiles_for
from bench import gpu_probe
from bench.param_lists import get_list

rc = gpu_probe.main(sys.argv[1:])
numels = [torch.Size(s).numel() for s in get_list("resnet8").shapes]

def chunks(block, tiles):  # chunks of ResNet-8's tensors (none above 2**20 elements)
    return sum(-(-n // (block * tiles)) for n in numels if n > block)

def tickets(block, tiles, programs):  # statistics tickets: runs of those chunks, cut for the programs
    return sum(map(len, ticket_runs(numels, Tiles(block, mid_chunk=tiles, programs=programs), programs)))

shipped = tiles_for(torch.float32, numels)
print("RESULT", json.dumps({
    "rc": rc,
    "shipped_mid": shipped.mid_chunk,
    "items": {str(m): chunks(4096, m) for m in (1, 4)},
    "tickets": {str(m): tickets(4096, m, 2) for m in (1, 4)},
    "shipped": chunks(shipped.block, shipped.mid_chunk),
    "kept": {f"{p.tiles.block} {p.tiles.mid_chunk}": p.num_partials for p in triton_plan.plans.values()},
}))
"""


@pytest.mark.skipif(_interpreter_broken() is not None, reason=str(_interpreter_broken()))
def test_probe_times_other_mid_chunks_each_with_its_own_plan(tmp_path: Path) -> None:
    # --mid-chunk-tiles: each value's plan has its own statistics items (its tiles were in effect), the
    # results pass the check, and the shipped configuration is still the one the host chooses.
    result = _rehearse(MID_CHUNKS, tmp_path, "--blocks", "4096", "--unrolls", "2", "--mid-chunk-tiles", "1,4")
    assert result["rc"] == 0 and result["shipped_mid"] == 1
    doc = json.loads((tmp_path / "gpu_probe.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert doc["cases"]["resnet8 float32"]["shipped_mid_chunk_tiles"] == 1
    for name, mid in (("triton b4096 u2 p2", 1), ("triton b4096 u2 p2 m4", 4)):
        row = rows[name]
        assert row["status"] == "ok" and row["mid_tiles"] == mid and row["max_err"] < 1e-5, row
        assert row["extra"]["partials"] == result["items"][str(mid)]
        assert row["extra"]["stats_items"] == result["tickets"][str(mid)]  # runs of them, for 2 programs
    assert rows["triton b4096 u2 p2"]["extra"]["stats_items"] < result["items"]["1"]  # runs of several
    assert result["items"]["4"] < result["items"]["1"]  # the list has tensors the two chunkings split apart
    # one plan per configuration, each with its own chunking: the shipped tiles', b4096 m1's and m4's
    kept = result["kept"]
    assert kept["4096 1"] == result["items"]["1"] and kept["4096 4"] == result["items"]["4"]
    assert kept["8192 1"] == result["shipped"]
    bad = subprocess.run(
        [sys.executable, "-m", "bench.gpu_probe", "--device", "cpu", "--out", str(tmp_path),
         "--mid-chunk-tiles", "0"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--mid-chunk-tiles takes integers >= 1" in bad.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_profile_script_parses_and_dry_runs(tmp_path: Path) -> None:
    script = ROOT / "bench" / "gpu_profile.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    commands = [line for line in proc.stdout.splitlines() if line.startswith("ncu ")]
    assert len(commands) == 4
    for line in commands:
        assert "--clock-control none" in line and "--launch-count" in line and "--ncu-target" in line
    assert "--ncu-target resnet56 float32 triton" in proc.stdout
    assert "--ncu-target llm bfloat16 cuda" in proc.stdout
    assert len(list(tmp_path.iterdir())) <= 4


def test_layouts_give_the_layout_before_23_side_by_side() -> None:
    import torch

    from bench import gpu_probe
    from bench.param_lists import get_list
    from znorm_kernels.backends.tiles import ticket_runs

    args = gpu_probe.parse_args(["--out", "x", "--blocks", "8192", "--per-sm", "2", "--unrolls", "2",
                                 "--layouts", "runs,chunks", "--few-programs-max-elements", "0"])  # fmt: skip
    plist = get_list("resnet56")
    variants = gpu_probe.grid_variants(args, plist, torch.float32, torch.device("cpu"), 8192, 4, 2)
    names = [v.name for v in variants]
    assert names == ["triton b8192 u2 p4", "triton b8192 u2 p4 chunks"]
    runs, chunks = (v.tiles() for v in variants)
    numels = [1 << 22, 10_000, 5_000_000]
    assert [runs.chunk(n) // 8192 for n in numels] == [8, 1, 8]  # as shipped
    assert [chunks.chunk(n) // 8192 for n in numels] == [32, 1, 32]  # as before #23
    assert all(set(r) == {1} for r in ticket_runs(numels, chunks, 4) if r)  # one ticket per chunk
    assert max(map(max, ticket_runs(numels, runs, 4))) > 1
    with pytest.raises(SystemExit):
        gpu_probe.parse_args(["--out", "x", "--layouts", "runs,sorted"])


def test_prefetch_variants_come_with_unroll_1_only() -> None:
    import torch

    from bench import gpu_probe
    from bench.param_lists import get_list

    args = gpu_probe.parse_args(["--out", "x", "--blocks", "8192", "--per-sm", "2", "--unrolls", "1,2",
                                 "--few-programs-max-elements", "0"])  # fmt: skip
    plist = get_list("resnet56")
    # Shipped as 16-bit lists with a large tensor are: unroll 1 with prefetch, which sorts first.
    variants = gpu_probe.grid_variants(
        args, plist, torch.bfloat16, torch.device("cpu"), 8192, 4, 1, 1, shipped_prefetch=True
    )
    names = [v.name for v in variants]
    assert names == ["triton b8192 u1 pf p4", "triton b8192 u1 p4", "triton b8192 u2 p4"]
    loads = [(t.unroll, t.prefetch) for t in (v.tiles() for v in variants)]
    assert loads == [(1, True), (1, False), (2, False)]
    args = gpu_probe.parse_args(["--out", "x", "--unrolls", "2", "--prefetch", "0"])
    assert args.prefetch == [0]
