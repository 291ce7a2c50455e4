"""The Triton kernel compiled for real GPUs, ahead of time and without one: the interpreter runs the kernel's
logic, this checks that it also lowers to PTX and machine code for sm_80 and sm_90, with the memory ordering
the work queue relies on (acquire loads while waiting, a release when statistics are published), 128-bit
accesses in the aligned specialization only, no FMA contraction, and registers that leave room for the
programs per SM the launch assumes (ptxas, where it is installed)."""

from __future__ import annotations

import re
import textwrap

import pytest

from tests.utils import compiled_ptx, ptxas_usage

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from znorm_kernels.backends.tiles import Tiles, tiles_for
    from znorm_kernels.backends.triton_aot import compile_for_target
    out = {}
    for case in json.loads(sys.argv[1]):
        dtype, arch, scale, norm, aligned, *rest = case
        given, unroll = bool(rest and rest[0]), (rest[1] if len(rest) > 1 else 1)
        prefetch = bool(len(rest) > 2 and rest[2])
        tiles = Tiles(tiles_for(getattr(torch, dtype)).block, unroll, prefetch=prefetch)
        k = compile_for_target(
            getattr(torch, dtype), arch, has_scale=scale, normalize=norm, aligned=aligned, given=given,
            tiles=tiles,
        )
        out["-".join(map(str, case))] = k.asm["ptx"]
    print(json.dumps(out))
    """
)

# dtype, arch, has_scale, normalize, aligned[, given: statistics applied, not computed[, unroll: 1 for lists
# without a tensor above LARGE_TENSOR, LARGE_UNROLL (2) for float32 lists with one[, prefetch: the next tile
# loaded while one is reduced, as 16-bit lists with one ship]]]
CASES = [
    ("float32", 90, True, True, True),
    ("float32", 90, False, True, True),
    ("float32", 90, False, False, True),
    ("float32", 90, False, True, False),
    ("float32", 80, False, True, True),
    ("float16", 90, False, True, True),
    ("bfloat16", 90, True, True, True),
    ("bfloat16", 90, True, True, False),
    ("float64", 90, False, True, True),
    ("float32", 90, False, True, True, True),
    ("bfloat16", 90, False, True, False, True),
    ("float32", 90, False, True, True, False, 2),
    ("float32", 90, True, True, False, False, 2),
    ("bfloat16", 90, True, True, True, False, 2),
    ("float16", 90, False, True, True, False, 2),
    ("bfloat16", 90, False, True, True, True, 2),
    ("float32", 90, True, True, True, False, 1, True),
    ("bfloat16", 90, True, True, True, False, 1, True),
    ("float16", 90, False, True, True, False, 1, True),
    ("float32", 90, False, True, False, False, 1, True),
]
# 128-bit accesses: 4 x 32 bits (float32, or 8 halves as 4 x 32 bits), 2 x 64 bits for float64.
VECTOR = {"float32": "v4.b32", "float16": "v4.b32", "bfloat16": "v4.b32", "float64": "v2.b64"}


@pytest.fixture(scope="module")
def ptx():
    return compiled_ptx(SCRIPT, CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_lowers_for_gpu(ptx, case):
    code = ptx["-".join(map(str, case))]
    assert ".entry znorm_queue_kernel" in code
    # The queue: relaxed ticket draws; statistics published with a release; waiters load with acquire.
    assert "atom.global.gpu.relaxed.add" in code
    given = len(case) > 5 and case[5]
    if case[3] and not given:
        assert "atom.global.gpu.release.add" in code
        assert "ld.global.gpu.acquire" in code
    else:
        assert "ld.global.gpu.acquire" not in code  # statistics only, or given: nobody waits


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_aligned_specialization_uses_128_bit_accesses(ptx, case):
    dtype, aligned = case[0], case[4]
    code = ptx["-".join(map(str, case))]
    loads = re.findall(r"ld\.global\.(v\d\.b\d+)", code)
    stores = re.findall(r"st\.global\.(v\d\.b\d+)", code)
    if aligned:
        assert VECTOR[dtype] in loads, "full tiles of aligned gradients load 16 bytes per instruction"
        if case[3]:
            assert VECTOR[dtype] in stores
    else:
        assert not loads and not stores, "unaligned views must keep element-wise accesses"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_no_fma_contraction_and_correctly_rounded_scalars(ptx, case):
    code = ptx["-".join(map(str, case))]
    assert not re.search(r"\bfma\.", code), "an FMA rounds differently from the interpreter and the reference"
    assert "sqrt.rn.f64" in code and "div.rn.f64" in code
    assert not re.search(r"\b(sqrt|div|rcp)\.(approx|full)", code)
    if case[3] and not (len(case) > 5 and case[5]):
        assert "nanosleep" in code, "waiting programs back off"


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 90], ids=lambda c: "-".join(map(str, c)))
def test_registers_leave_two_programs_per_sm(ptx, case, tmp_path):
    # 8 warps at <= 128 registers per thread: two programs per SM (the launch reads the figure from the
    # compiled kernel on a GPU; this keeps the kernel from growing past it unnoticed). Spills, in bytes, with
    # 8192-element tiles (ptxas of CUDA 13.0), stay under the limits below; Triton 3.6 (the GPU machine's)
    # spills more than Triton 3.8 in every variant (each variant's figures under both:
    # bench/log/2026-12-07-dev-cpu-tile-loop.md). The H100 probe measured those
    # tiles, spills included, as the fastest on the 707 M list (bench/log/2026-11-27-h100-run3.md). The
    # element-wise variant for unaligned views (rare) spills more.
    regs, spills, report = ptxas_usage(ptx["-".join(map(str, case))], tmp_path)
    assert regs <= 128, f"{regs} registers: fewer programs fit an SM"
    unroll = case[6] if len(case) > 6 else 1
    two_tiles = unroll > 1 or (len(case) > 7 and case[7])  # unrolled, or a tile in flight while one reduces
    limit = 512 if not case[4] else 256 if two_tiles else 64
    assert max(spills, default=0) <= limit, report


TIMELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from znorm_kernels.backends.tiles import tiles_for
    from znorm_kernels.backends.triton_aot import compile_for_target
    out = {}
    for dtype, timeline in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        k = compile_for_target(dt, 90, has_scale=False, tiles=tiles_for(dt, [1 << 21]), timeline=timeline)
        out[f"{dtype}-{timeline}"] = k.asm["ptx"]
    print(json.dumps(out))
    """
)


def test_the_timeline_variant_reads_the_gpu_timer_and_keeps_the_occupancy(tmp_path):
    # The diagnostic variant (triton_host.timeline_) stamps each ticket with %globaltimer and %smid, and must
    # keep two programs per SM, or its picture would be of another schedule; the shipped variants read
    # neither register.
    cases = [("float32", True), ("bfloat16", True), ("bfloat16", False)]
    ptx = compiled_ptx(TIMELINE_SCRIPT, cases)
    for dtype, timeline in cases:
        code = ptx[f"{dtype}-{timeline}"]
        assert ("%globaltimer" in code) is timeline and ("%smid" in code) is timeline
        regs, _, report = ptxas_usage(code, tmp_path)
        assert regs <= 128, report
