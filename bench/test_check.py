"""The benchmark's own logic, without timing: the accuracy gate, the parameter lists, the report."""

from __future__ import annotations

import contextlib

import pytest
import torch

import znorm_kernels
from bench.alternatives import EPS, eager_loop
from bench.param_lists import get_list
from bench.report import derive, markdown
from bench.suite import make_grads
from znorm_kernels.accuracy import z_error, z_float64


@pytest.mark.parametrize(
    ("name", "tensors", "elements"),
    [
        ("resnet56", 167, 853_018),
        ("resnet110", 329, 1_727_962),
        ("resnet152", 455, 2_408_474),
        ("resnet50", 161, 25_557_032),
        ("vitb16", 152, 86_567_656),
        ("llm", 147, 707_325_952),
        ("llm-d512", 147, 63_585_280),
        ("plain100m", 1, 100_000_000),
    ],
)
def test_lists_match_perf_md(name: str, tensors: int, elements: int) -> None:
    if name in ("resnet50", "vitb16"):
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
    train["hook_host_us"] = {"no ZNorm": 1.5, "znorm_kernels.register (backend triton)": 97.25}
    train["hook_paths"] = {"full checks": 0, "moved": 30, "plans built": 2}
    text = train_markdown(train)
    assert "| znorm_kernels.register (backend triton) | 20.90 | +0.5% | 97.2 |" in text
    assert "0 full checks, 30 with the gradients at new addresses" in text and "2 Triton plans built" in text
    train.update(
        pipelined={
            "no ZNorm": 20.0,
            "eager loop (step pre-hook)": 27.0,
            "znorm_kernels.register (backend triton)": 20.1,
        },
        pipelined_steps=10,
        pipelined_rounds=5,
    )
    text = train_markdown(train)
    assert "| znorm_kernels.register (backend triton) | 20.90 | +0.5% | 97.2 | 20.10 | +0.5% |" in text
    assert "10 steps back to back" in text
    train["graphed"] = {"no ZNorm": 5.0, "znorm_kernels.register": 5.04}
    text = train_markdown(train)
    assert "| no ZNorm, graphed | 5.00 | | 4.00x |" in text
    assert "| znorm_kernels.register, graphed | 5.04 | +0.8% | |" in text
    targets = targets_markdown(rows, train, "cuda")
    assert (
        "| ResNet-56 training step graphed: >= 3x faster than eager | the graphed step | 4.00x | yes |"
        in targets
    )
    assert (
        "| ResNet-56 training step graphed: ZNorm's share < 1% | znorm_kernels.register | +0.8% | yes |"
        in (targets)
    )
    del train["graphed"]
    assert (
        "| ResNet-56 training step, pipelined: < 1% overhead | znorm_kernels.register (backend triton) "
        "| +0.5% | yes |" in targets_markdown(rows, train, "cuda")
    )
    del train["pipelined"]
    targets = targets_markdown(rows, train, "cuda")
    assert "| ResNet-56 float32: <= 12 µs device time | triton | 11.0 µs | yes |" in targets
    # The host-time target reads the host's own cost (30 µs), not the synchronized hook time (60 µs).
    assert "| ResNet-56 float32: <= 50 µs host time per hook call | triton | 30.0 µs | yes |" in targets
    assert "40 µs" not in targets and "85%" not in targets  # the cuda backend's targets: no cuda rows here
    # With the figure of the hook alone (warm), the target is judged on it; the round-robin one is shown.
    warm = [dict(r) for r in rows]
    warm[-3]["hook_host_alone_us"], warm[-3]["hook_host_us"] = 45.0, 400.0
    assert (
        "| ResNet-56 float32: <= 50 µs host time per hook call | triton | 45.0 µs alone (round-robin "
        "with the other methods: 400.0 µs) | yes |" in targets_markdown(warm, None, "cuda")
    )
    assert "| 400 | 45.0 |" in markdown(warm, cases, "cuda")
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


def test_cpu_report_has_no_gpu_busy_column() -> None:
    # CPU rows carry no GPU-busy figure (older results.json rows lack the key altogether): no column, no note.
    base = {"list": "resnet56", "label": "L", "dtype": "float32", "tensors": 1, "elements": 1000}
    common = {"device": "cpu", "launches": 1, "launches_what": "ops", "max_err": 1e-7, "error": None}
    times = {"hook_us": 12.0, "hook_host_us": 12.0}
    rows = [
        {**base, **common, **times, "method": "eager", "ours": False, "device_us": 100.0},
        {**base, **common, **times, "method": "cpu", "ours": True, "device_us": 10.0, "device_busy_us": None},
    ]
    cases = {"resnet56/float32": {"copy_gbps": 2.4}}
    derive(rows, cases)
    assert rows[1]["copy_frac_busy"] is None
    text = markdown(rows, cases, "cpu")
    assert "busy" not in text and "GPU-bound" not in text
    assert "| resnet56 | float32 | **cpu** | 10.0 | 12.0 | 1.2 | 50% |" in text


def test_cuda_report_and_targets_on_the_gpu_bound_figure() -> None:
    from bench.report import targets_markdown

    base = {"label": "L", "tensors": 167, "elements": 853_018, "device": "cuda", "launches_what": "kernels"}
    common = {"launches": 1, "max_err": 1e-7, "error": None, "list": "resnet56", "dtype": "float32"}
    hook = {"hook_us": 200.0, "hook_host_us": 150.0}
    rows = [
        {**base, **common, **hook, "method": "eager", "ours": False, "device_us": 7927.0},  # no busy figure
        {
            **base,
            **common,
            **hook,
            "method": "triton",
            "ours": True,
            "device_us": 72.6,
            "device_busy_us": 9.1,
            "busy_reps": 100,
            "busy_starved": 0,
        },
        {
            **base,
            **common,
            **hook,
            "method": "cuda",
            "ours": True,
            "device_us": 36.2,  # under 40 by do_bench, over it with the host taken out: judged NO
            "device_busy_us": 41.0,
            "busy_reps": 100,
            "busy_starved": 3,
        },
    ]
    cases = {"resnet56/float32": {"copy_gbps": 3000.0, "copy_busy_gbps": 2000.0}}
    derive(rows, cases)
    needed = 12 * 853_018
    assert rows[1]["gbps"] == pytest.approx(needed / 72.6e-6 / 1e9)  # GB/s stays do_bench's
    assert rows[1]["copy_frac"] == pytest.approx(needed / 72.6e-6 / 1e9 / 3000.0)
    assert rows[1]["copy_frac_busy"] == pytest.approx(needed / 9.1e-6 / 1e9 / 2000.0)
    assert rows[0]["copy_frac_busy"] is None
    text = markdown(rows, cases, "cuda")
    head = next(line for line in text.splitlines() if line.startswith("| list | dtype | method"))
    assert "| device µs | device µs (GPU busy ahead) | hook µs (synced) |" in head
    assert "| % copy | % copy (busy) |" in head
    assert "| **triton** | 72.6 | 9.1 | 200 | 150 |" in text
    assert "| **cuda** | 36.2 | 41.0* |" in text and "resnet56 float32 cuda 3/100" in text
    assert "| eager | 7,927 |  | 200 |" in text
    targets = targets_markdown(rows, None, "cuda")
    assert (
        "| ResNet-56 float32: <= 12 µs device time | triton | 72.6 µs (GPU-bound: 9.1 µs) | yes |" in targets
    )
    assert (
        "| ResNet-56 float32: <= 40 µs device time | cuda | 36.2 µs (GPU-bound: 41.0 µs*) | NO |" in targets
    )
    assert "judged on the GPU-bound figure" in targets
    # The host-time target is not a device time: no GPU-bound figure beside it.
    assert "| <= 50 µs host time per hook call | triton | 150.0 µs | NO |" in targets.replace(
        "ResNet-56 float32: ", ""
    )
    # Without the busy figures (e.g. --busy-seconds 0) the targets read do_bench's figure, and no note.
    for row in rows:
        row.pop("device_busy_us", None)
    targets = targets_markdown(rows, None, "cuda")
    assert "| triton | 72.6 µs | NO |" in targets and "| cuda | 36.2 µs | yes |" in targets
    assert "GPU-bound" not in targets


class _FakeGpu:
    """A simulated GPU and host for device_time_gpu_bound: one in-order stream; the host's clock advances by
    what the host does, the GPU's work starts when both it is enqueued and the GPU is free. Times in µs."""

    def __init__(self, cycles_per_us: float = 1755.0, flush_us: float = 85.0, launch_us: float = 2.0) -> None:
        self.host = 0.0
        self.free = 0.0  # the GPU is busy until then
        self.rate, self.flush_us, self.launch_us = cycles_per_us, flush_us, launch_us
        self.sleeps: list[float] = []
        self.inside = False  # within current(): every operation must be (the device current)

    def clock(self) -> float:
        return self.host * 1e-6

    @contextlib.contextmanager
    def current(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def enqueue(self, us: float) -> None:
        assert self.inside, "a GPU operation outside the device's context"
        self.host += self.launch_us
        self.free = max(self.free, self.host) + us

    def sleep(self, cycles: int) -> None:
        self.sleeps.append(cycles / self.rate)
        self.enqueue(cycles / self.rate)

    def flush_l2(self) -> None:
        self.enqueue(self.flush_us)

    def synchronize(self) -> None:
        self.host = max(self.host, self.free)

    def event(self) -> _FakeEvent:
        return _FakeEvent(self)


class _FakeEvent:
    def __init__(self, gpu: _FakeGpu) -> None:
        self.gpu, self.at = gpu, None

    def record(self) -> None:
        assert self.gpu.inside, "an event recorded outside the device's context"
        self.gpu.host += 0.5
        self.at = max(self.gpu.host, self.gpu.free)  # reached when the GPU gets there

    def query(self) -> bool:
        return self.at <= self.gpu.host

    def synchronize(self) -> None:
        self.gpu.host = max(self.gpu.host, self.at)

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.at - self.at) * 1e-3  # ms, as torch.cuda.Event


def _fake_call(gpu: _FakeGpu, kernels: int, host_us: float, device_us: float, sync: bool = False):
    """A call that spends host_us on the host over ``kernels`` launches doing device_us of GPU work."""

    def fn() -> None:
        for _ in range(kernels):
            gpu.host += host_us / kernels - gpu.launch_us
            gpu.enqueue(device_us / kernels)
            if sync:
                gpu.synchronize()

    return fn


def test_gpu_bound_timing_takes_the_host_off_the_critical_path() -> None:
    from bench.timing import device_time_gpu_bound

    # A do_bench-like start (the GPU idle when the call starts) would time the host: 150 µs. Kept busy, the
    # GPU runs the call's 20 µs back to back.
    gpu = _FakeGpu()
    fn = _fake_call(gpu, kernels=10, host_us=150.0, device_us=20.0)
    r = device_time_gpu_bound(fn, "cuda", reps=40, max_s=1.0, layer=gpu)
    assert r.us == pytest.approx(20.0) and r.min_us == pytest.approx(20.0)
    assert r.reps == 40 and r.starved == 0
    assert r.host_us == pytest.approx(150.0)
    assert r.sleep_us == pytest.approx(2 * 150.0 + 50)
    assert all(s == pytest.approx(350.0, rel=0.01) for s in gpu.sleeps[2:])  # after the calibration
    # The same call with the GPU idle before each call (what the events time without the sleep): host-bound.
    with gpu.current():
        gpu.synchronize()
        s, e = gpu.event(), gpu.event()
        s.record()
        fn()
        e.record()
    assert s.elapsed_time(e) * 1e3 > 140.0


def test_gpu_bound_timing_runs_on_its_own_device() -> None:
    # The sleep and the events act on the current device: the timing makes its device current (cuda:1 with
    # cuda:0 current would otherwise time an idle GPU), and the fake GPU refuses any operation outside that.
    from bench.timing import CudaLayer, device_time_gpu_bound

    assert CudaLayer("cuda:1").current().idx == 1
    gpu = _FakeGpu()
    r = device_time_gpu_bound(_fake_call(gpu, 10, 150.0, 20.0), "cuda:1", reps=5, layer=gpu)
    assert r.reps == 5 and not gpu.inside
    with pytest.raises(AssertionError, match="outside the device"):
        _fake_call(gpu, 10, 150.0, 20.0)()


def test_gpu_bound_timing_is_bounded_and_flags_a_starved_gpu() -> None:
    from bench.timing import device_time_gpu_bound

    # Time cap: per call about 350 µs sleep + 85 µs flush + 150 µs synchronized call -> 10 ms holds 17.
    gpu = _FakeGpu()
    r = device_time_gpu_bound(_fake_call(gpu, 10, 150.0, 20.0), "cuda", reps=1000, max_s=0.01, layer=gpu)
    assert 10 <= r.reps <= 20
    gpu = _FakeGpu()
    r = device_time_gpu_bound(_fake_call(gpu, 10, 150.0, 20.0), "cuda", reps=1000, max_s=0.0, layer=gpu)
    assert r.reps == 3  # min_reps
    # A call that synchronizes inside: the GPU drains its backlog, the host is timed again, and it is said.
    gpu = _FakeGpu()
    r = device_time_gpu_bound(_fake_call(gpu, 10, 150.0, 20.0, sync=True), "cuda", reps=8, layer=gpu)
    assert r.starved == r.reps == 8 and r.us > 100.0


def test_cpu_rows_have_no_gpu_busy_figure() -> None:
    from bench.suite import CaseOptions, run_case

    rows = run_case(
        get_list("resnet20"),
        torch.float32,
        torch.device("cpu"),
        [],
        ["reference"],
        CaseOptions(reps=3, max_s=0.02, count_launches=False),
    )
    assert rows and all(r["device_us"] and r["device_busy_us"] is None for r in rows)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_step_counts_the_hooks_paths(backend):
    """bench.train_step's path counter: nothing while not counting; then a step at the same addresses counts
    nothing, one at new addresses counts a move (on triton, the plan moved, none built), one with another
    dtype a full check."""
    import znorm_kernels
    from bench.train_step import _PathCounter
    from znorm_kernels import step_cache

    if backend not in znorm_kernels.available_backends():
        pytest.skip(f"{backend} unavailable")
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
    opt = torch.optim.SGD(params, lr=0.0)
    znorm_kernels.register(opt, backend=backend)
    real = step_cache.GradientGroups._check
    with _PathCounter() as paths:
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the first call: a full check, not counted
        paths.counting = True
        opt.step()
        assert paths.counts == {"full checks": 0, "moved": 0, "plans built": 0, "plans moved": 0}
        for p in params:
            p.grad = torch.randn_like(p) + 0  # new storage
        opt.step()
        paths.counting = False  # (the plans are counted when counting stops)
        assert paths.counts["moved"] == 1 and paths.counts["full checks"] == 0
        assert paths.counts["plans built"] == 0
        assert paths.counts["plans moved"] == (backend == "triton")
        paths.counting = True
        params[1].data = params[1].data.double()
        params[1].grad = torch.randn(5, dtype=torch.float64)
        opt.step()
        assert paths.counts["full checks"] == 1
    assert step_cache.GradientGroups._check is real


def test_training_step_profile_writes_its_table_and_traces(tmp_path):
    """bench.train_step --profile on the CPU: a row per variant, operator tables, one trace per variant."""
    from bench.train_step import profile_training_step

    doc = profile_training_step(torch.device("cpu"), 2, tmp_path, steps=1, backend="cpu")
    assert (tmp_path / "train_profile.md").read_text() == doc
    for name in ("no ZNorm", "eager loop (step pre-hook)", "znorm_kernels.register (backend cpu)"):
        assert f"| {name} | " in doc and f"## {name}" in doc
    assert "Top 15 by self CPU time" in doc and "aten::convolution_backward" in doc
    traces = sorted(p.name for p in tmp_path.glob("trace_*.json.gz"))
    assert traces == [f"trace_{k}.json.gz" for k in range(3)]
