"""The benchmark's own logic, without timing: the accuracy gate, the parameter lists, the report."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop
from bench.check import z_error, z_float64
from bench.param_lists import get_list
from bench.report import derive, markdown
from bench.suite import make_grads


@pytest.mark.parametrize(
    ("name", "tensors", "elements"),
    [
        ("resnet56", 167, 853_018),
        ("resnet110", 329, 1_727_962),
        ("resnet152", 455, 2_408_474),
        ("resnet50", 161, 25_557_032),
        ("llm", 147, 707_325_952),
        ("llm-d512", 147, 63_585_280),
        ("plain100m", 1, 100_000_000),
    ],
)
def test_lists_match_perf_md(name: str, tensors: int, elements: int) -> None:
    if name == "resnet50":
        pytest.importorskip("torchvision")
    plist = get_list(name)
    assert (plist.tensors, plist.elements) == (tensors, elements)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_accepts_the_reference_and_rejects_an_error(dtype: torch.dtype) -> None:
    inputs = make_grads([(300,), (17, 9), (4, 3, 3, 3)], "cpu", dtype)
    expected = [z_float64(x, EPS) for x in inputs]
    grads = [x.clone() for x in inputs]
    znorm_kernels.znorm_(grads, eps=EPS, backend="reference")
    err, excess = z_error(grads, expected)
    assert excess <= 0 and err < 0.02
    wrong = [g.clone() for g in grads]
    wrong[1].view(-1)[5] += 0.1  # one element off by far more than half a bf16 ulp
    assert z_error(wrong, expected)[1] > 0
    nan = [g.clone() for g in grads]
    nan[2].view(-1)[0] = float("nan")
    assert z_error(nan, expected)[1] > 0


def test_check_allows_half_a_bfloat16_ulp_not_a_whole_one() -> None:
    expected = [torch.tensor([1.0, -1.0], dtype=torch.float64)]
    ulp = 2.0**-7  # bfloat16 at 1.0
    within = [torch.tensor([1.0 + 0.45 * ulp, -1.0], dtype=torch.float64).to(torch.bfloat16)]
    # A bfloat16 holding 1 + ulp is one whole ulp off: beyond contract rule 10's half ulp plus 1e-5.
    beyond = [torch.tensor([1.0 + ulp, -1.0], dtype=torch.bfloat16)]
    assert z_error(within, expected)[1] <= 0
    assert z_error(beyond, expected)[1] > 0


def test_eager_loop_is_the_formula() -> None:
    inputs = make_grads([(1000,), (8, 8)], "cpu", torch.float32)
    grads = [x.clone() for x in inputs]
    eager_loop(grads)
    assert z_error(grads, [z_float64(x, EPS) for x in inputs])[1] <= 0


def test_report_derives_ratios() -> None:
    base = {"list": "l", "label": "L", "dtype": "float32", "tensors": 1, "elements": 1000, "device": "cpu"}
    rows = [
        {
            **base,
            "method": "eager",
            "ours": False,
            "device_us": 100.0,
            "hook_us": 110.0,
            "hook_host_us": 110.0,
            "launches": 5,
            "launches_what": "ops",
            "max_err": 1e-7,
            "error": None,
        },
        {
            **base,
            "method": "cpu",
            "ours": True,
            "device_us": 10.0,
            "hook_us": 12.0,
            "hook_host_us": 12.0,
            "launches": 1,
            "launches_what": "ops",
            "max_err": 1e-7,
            "error": None,
        },
    ]
    derive(rows, {"l/float32": {"copy_gbps": 2.4}})
    assert rows[1]["x_best_alt"] == pytest.approx(10.0)
    assert rows[1]["gbps"] == pytest.approx(12_000 / 10e-6 / 1e9)
    assert rows[1]["copy_frac"] == pytest.approx(0.5)
    assert "**cpu**" in markdown(rows, {"l/float32": {"copy_gbps": 2.4}}, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole GPU check")
def test_gpu_check_without_a_gpu_says_so(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gpu_check.sh")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    cmd = ["bash", str(script), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "GPU present: NO" in summary
    assert "| versions | 0 |" in summary
    assert "| bench | - | 0 | skipped: no CUDA device |" in summary


def test_cuda_report_and_targets() -> None:
    from bench.report import targets_markdown, train_markdown

    base = {"label": "L", "tensors": 167, "elements": 853_018, "device": "cuda", "launches_what": "kernels"}
    common = {"launches": 1, "max_err": 1e-7, "error": None}
    rows = [
        {
            **base,
            **common,
            "list": "resnet56",
            "dtype": "float32",
            "method": "eager",
            "ours": False,
            "device_us": 7927.0,
            "hook_us": 8000.0,
            "hook_host_us": 7000.0,
        },
        {
            **base,
            **common,
            "list": "resnet56",
            "dtype": "float32",
            "method": "compiled",
            "ours": False,
            "device_us": 3218.0,
            "hook_us": 3300.0,
            "hook_host_us": 300.0,
        },
        {
            **base,
            **common,
            "list": "resnet56",
            "dtype": "float32",
            "method": "triton",
            "ours": True,
            "device_us": 11.0,
            "hook_us": 60.0,
            "hook_host_us": 30.0,
        },
        {
            **base,
            **common,
            "list": "llm",
            "dtype": "float32",
            "method": "triton",
            "ours": True,
            "elements": 707_325_952,
            "device_us": 3100.0,
            "hook_us": 3200.0,
            "hook_host_us": 40.0,
        },
        {
            **base,
            **common,
            "list": "llm",
            "dtype": "float32",
            "method": "compiled+graph",
            "ours": False,
            "elements": 707_325_952,
            "device_us": None,
            "hook_us": None,
            "hook_host_us": None,
            "error": "skipped: time budget spent",
        },
    ]
    cases = {"resnet56/float32": {"copy_gbps": 3000.0}, "llm/float32": {"copy_gbps": 3000.0}}
    derive(rows, cases)
    text = markdown(rows, cases, "cuda")
    assert "hook host µs" in text and "skipped: time budget spent" in text
    train = {
        "batch": 256,
        "steps": 30,
        "precision": "bf16 autocast",
        "memory_format": "channels_last",
        "variants": {
            "no ZNorm": 20.8,
            "eager loop (step pre-hook)": 28.8,
            "znorm_kernels.register (backend triton)": 20.9,
        },
    }
    assert "+38.5%" in train_markdown(train)
    targets = targets_markdown(rows, train, "cuda")
    assert "| ResNet-56 float32: <= 12 µs device time | triton | 11.0 µs | yes |" in targets
    # The host-time target reads the host's own cost (30 µs), not the synchronized hook time (60 µs).
    assert "| ResNet-56 float32: <= 50 µs host time per hook call | triton | 30.0 µs | yes |" in targets
    assert "40 µs" not in targets and "85%" not in targets  # the cuda backend's targets: no cuda rows here
    assert "LLM 707 M float32: >= 90% of the copy bandwidth | triton | 91% | yes" in targets
    assert "< 1% overhead" in targets


def test_launches_counted_in_a_last_pass_when_asked() -> None:
    # On CUDA the bench times every case first and counts launches last (the profiler would slow every later
    # launch): a timing pass without counts, then a count_only pass that times nothing.
    from bench.suite import CaseOptions, run_case

    plist, device = get_list("resnet20"), torch.device("cpu")
    timed = run_case(
        plist,
        torch.float32,
        device,
        ["eager"],
        ["reference"],
        CaseOptions(reps=3, max_s=0.05, count_launches=False),
    )
    assert all(r["launches"] is None and r["device_us"] is not None for r in timed)
    counted = run_case(plist, torch.float32, device, ["eager"], ["reference"], CaseOptions(), count_only=True)
    assert {r["method"] for r in counted} == {r["method"] for r in timed}
    assert all(r["launches"] and r["device_us"] is None and r["hook_host_us"] is None for r in counted)
