"""The ZNorm optimizers (znorm_kernels.optim): every option against ``register(torch optimizer)`` over
several steps, checkpoints both ways with torch's optimizers, schedulers, closures, GradScaler, per-group
switches, the raw gradient left alone, the statistics by-product, and bad input.

Models have no conv bias in front of BatchNorm (that bias's gradient is rounding noise, which ZNorm scales to
unit variance, so no two implementations agree on it)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import count_calls
from znorm_kernels.optim import ZNormAdam, ZNormAdamW, ZNormSGD

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in znorm_kernels.available_backends()]
# Where each backend is tested: Triton takes CUDA tensors where a GPU is present (its CPU tensors only under
# the interpreter, which tests/conftest.py turns on only without a GPU); the others take CPU tensors.
DEVICE_OF = {
    "reference": "cpu",
    "cpu": "cpu",
    "auto": "cpu",
    "triton": "cuda" if torch.cuda.is_available() else "cpu",
}
# Tolerances of a fused update against the hook + torch's update, per device: torch's CPU kernels fuse a
# multiply-add where ours round each operation (float32 rounding apart); on CUDA torch's kernels and the
# convolutions' own rounding differ a little more (as in test_on_cuda_the_fused_step_matches_hook_on_torch).
FUSED_TOL = {"cpu": dict(atol=2e-6, rtol=1e-5), "cuda": dict(atol=2e-5, rtol=1e-4)}


def make_model(seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )
    return model.to(device)


def batches(n: int = 4, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]
    return [(x.to(device), y.to(device)) for x, y in data]


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 0.0, rtol: float = 0.0) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def compare(znorm_cls, torch_cls, backend, steps=4, **kwargs):
    device = DEVICE_OF[backend]
    ours, theirs = make_model(device=device), make_model(device=device)
    opt = znorm_cls(ours.parameters(), backend=backend, **kwargs)
    ref = torch_cls(theirs.parameters(), **kwargs)
    znorm_kernels.register(ref, backend=backend)
    data = batches(steps, device)
    train(ours, opt, data)
    train(theirs, ref, data)
    # The same z-scores then torch's own update: bitwise equal. Triton's fused update computes the same
    # z-scores and torch's formulas, rounding each operation where torch's CPU kernels fuse a multiply-add:
    # float32 rounding apart.
    tol = FUSED_TOL[device] if backend in ("triton", "cpu") else dict(atol=0, rtol=0)
    assert_same_params(ours, theirs, **tol)
    for s_ours, s_ref in zip(opt.state.values(), ref.state.values()):
        assert set(s_ours) == set(s_ref), "torch's state format"
        for key in s_ref:
            assert s_ours[key].dtype == s_ref[key].dtype and s_ours[key].device == s_ref[key].device
            torch.testing.assert_close(s_ours[key], s_ref[key], **tol)
    return opt


SGD_OPTIONS = [
    dict(lr=0.05, momentum=m, dampening=d, nesterov=n, weight_decay=w, maximize=mx, foreach=f)
    for m, d, n, w, mx, f in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-2], [False, True], [False, True]
    )
    if not (n and (m == 0 or d != 0))  # torch: nesterov needs momentum and no dampening
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_sgd_matches_hook_on_torch_sgd(backend, options):
    if backend == "triton" and (options["foreach"] or options["maximize"]):
        pytest.skip("a subset on triton (slow interpreter; on a GPU each option set compiles a kernel)")
    compare(ZNormSGD, torch.optim.SGD, backend, **options)


ADAM_OPTIONS = [
    dict(lr=1e-2, weight_decay=w, amsgrad=a, maximize=mx, foreach=f)
    for w, a, mx, f in itertools.product([0.0, 1e-2], [False, True], [False, True], [False, True])
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adamw", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_adam_matches_hook_on_torch_adam(backend, adamw, options):
    if backend == "triton" and (options["foreach"] or options["maximize"]):
        pytest.skip("a subset on triton (slow interpreter; on a GPU each option set compiles a kernel)")
    if adamw:
        compare(ZNormAdamW, torch.optim.AdamW, backend, **options)
    else:
        compare(ZNormAdam, torch.optim.Adam, backend, betas=(0.8, 0.99), **options)


@pytest.mark.parametrize(
    "cls, torch_cls, kwargs",
    [
        (ZNormSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        (ZNormAdam, torch.optim.Adam, dict(lr=1e-2)),
        (ZNormAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    ],
)
def test_fused_torch_update_matches(cls, torch_cls, kwargs):
    compare(cls, torch_cls, "auto", fused=True, **kwargs)


def test_gradient_is_left_raw_by_default_and_normalized_on_request():
    model = make_model()
    opt = ZNormAdam(model.parameters(), lr=1e-2)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    opt.step()
    for p, g, r in zip(model.parameters(), grads, raw):
        assert p.grad is g, "the same .grad tensor object afterwards"
        assert torch.equal(p.grad, r), "and its values untouched"

    model = make_model()
    opt = ZNormAdam(model.parameters(), lr=1e-2, normalize_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    opt.step()
    expected = [r.clone() for r in raw]
    znorm_kernels.reference.znorm_(expected)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)


def test_state_dict_moves_to_torch_and_back():
    data = batches(6)
    ours = make_model()
    opt = ZNormAdam(ours.parameters(), lr=1e-2, amsgrad=True)
    train(ours, opt, data[:3])
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"state", "param_groups"}

    # Into torch's Adam (what a user who drops ZNorm does) and back into ZNormAdam.
    plain = torch.optim.Adam(ours.parameters(), lr=1e-2, amsgrad=True)
    plain.load_state_dict(saved)
    back = ZNormAdam(ours.parameters(), lr=1.0)
    back.load_state_dict(plain.state_dict())
    assert back.param_groups[0]["lr"] == 1e-2 and back.param_groups[0]["amsgrad"] is True
    assert back.param_groups[0]["znorm"] is True and back.param_groups[0]["min_ndim"] == 1

    # Continuing from the reloaded state gives what continuing the original does.
    twin = copy.deepcopy(ours)
    opt_twin = ZNormAdam(twin.parameters(), lr=1.0)
    opt_twin.load_state_dict(saved)
    train(ours, opt, data[3:])
    train(twin, opt_twin, data[3:])
    assert_same_params(ours, twin)

    # A checkpoint of torch's Adam (no ZNorm keys) loads into ZNormAdam, with the ZNorm defaults.
    fresh = torch.optim.Adam(make_model().parameters(), lr=3e-3)
    z = ZNormAdam(make_model().parameters(), min_ndim=2)
    z.load_state_dict(fresh.state_dict())
    assert z.param_groups[0]["min_ndim"] == 2 and z.param_groups[0]["lr"] == 3e-3


def test_pickle_round_trip_keeps_znorm_options():
    opt = ZNormSGD(
        make_model().parameters(), lr=0.1, momentum=0.9, min_ndim=2, znorm_eps=1e-6, track_stats=True
    )
    twin = copy.deepcopy(opt)
    assert twin._znorm == opt._znorm
    assert twin.param_groups[0]["min_ndim"] == 2
    # A pickle of a version that kept the settings in a plain dict still loads, as the settings object.
    state = opt.__getstate__()
    state["_znorm"] = dataclasses.asdict(opt._znorm)
    old = ZNormSGD.__new__(ZNormSGD)
    old.__setstate__(state)
    assert old._znorm == opt._znorm


def test_scheduler_and_closure():
    data = batches(4)
    ours, theirs = make_model(), make_model()
    opt = ZNormSGD(ours.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    znorm_kernels.register(ref)
    sched_a = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    train(ours, opt, data[:2], sched_a)
    train(theirs, ref, data[:2], sched_b)
    assert opt.param_groups[0]["lr"] == 0.025
    for x, y in data[2:]:
        for model, o in ((ours, opt), (theirs, ref)):

            def closure(model=model, o=o, x=x, y=y):
                o.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            assert o.step(closure) is not None
    assert_same_params(ours, theirs, atol=2e-6, rtol=1e-5)  # the fused CPU step: float32 rounding apart


@pytest.mark.parametrize("backend", BACKENDS)  # the fused step and the general path
def test_per_group_switches(backend):
    device = DEVICE_OF[backend]
    model = make_model(device=device)
    conv, bn, lin = model[0], model[1], model[4]
    opt = ZNormSGD(
        [
            {"params": conv.parameters()},
            {"params": bn.parameters(), "znorm": False},
            {"params": lin.parameters(), "min_ndim": 2},
        ],
        lr=0.1,
        backend=backend,
    )
    x, y = batches(1, device)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        z = raw[name].clone()
        if name in ("0.weight", "4.weight"):  # normalized; bn (znorm=False) and the linear bias (1-D) are not
            znorm_kernels.reference.znorm_([z])
        torch.testing.assert_close(p, before[name] - 0.1 * z, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_stats_by_product(backend):
    model = make_model(device=DEVICE_OF[backend])
    params = list(model.named_parameters())
    opt = ZNormSGD(params, lr=0.1, backend=backend, track_stats=True)
    assert opt.grad_stats() is None
    x, y = batches(1, DEVICE_OF[backend])[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[1].bias.grad = None  # a parameter without a gradient: NaN row
    raw = {n: None if p.grad is None else p.grad.clone() for n, p in params}
    opt.step()
    stats = opt.grad_stats()
    assert stats.names == [n for n, _ in params]
    assert stats.values.dtype == torch.float64 and stats.values.shape == (len(params), 2)
    for i, (name, _) in enumerate(params):
        g = raw[name]
        if g is None:
            assert stats.values[i].isnan().all()
            continue
        g = g.double()
        torch.testing.assert_close(stats.mean[i], g.mean(), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(stats.std[i], g.std(correction=0), atol=1e-7, rtol=1e-6)
    logged = stats.as_dict()
    assert set(logged) == {f"grad_{k}/{n}" for n, _ in params for k in ("mean", "std")}


def test_grad_stats_needs_track_stats():
    opt = ZNormSGD(make_model().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"^gradient statistics are kept only with track_stats=True$"):
        opt.grad_stats()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_ndim=-1), "min_ndim"),
        (dict(min_ndim=True), "min_ndim"),
        (dict(znorm_eps=-1.0), "eps"),
        (dict(backend="nope"), "backend"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZNormSGD(make_model().parameters(), lr=0.1, **kwargs)


def test_bad_group_option_raises():
    model = make_model()
    opt = ZNormSGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="min_ndim"):
        opt.add_param_group({"params": model[4].parameters(), "min_ndim": "2"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_raises_naming_it_and_changes_nothing(backend):
    # The fused step names the optimizer's step, the general path the library call it makes; both name the
    # parameter.
    device = DEVICE_OF[backend]
    emb = nn.Embedding(10, 3, sparse=True).to(device)
    opt = ZNormSGD(emb.named_parameters(), lr=0.1, backend=backend)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    before = emb.weight.detach().clone()
    where = "znorm_" if backend == "reference" else "ZNormSGD.step"
    msg = f"{where}: tensor at position 0 (parameter 'weight') is sparse (torch.sparse_coo); ZNorm needs"
    with pytest.raises(TypeError, match=f"^{re.escape(msg)} dense gradients$"):
        opt.step()
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("cls, torch_cls", [(ZNormSGD, torch.optim.SGD), (ZNormAdam, torch.optim.Adam)])
def test_grad_scaler_with_fused_update(cls, torch_cls):
    # fused=True: GradScaler leaves the gradients scaled and hands the optimizer grad_scale and found_inf;
    # the z-scores (and the statistics) are those of the unscaled gradients; no host sync on our side.
    kwargs = dict(lr=0.05, momentum=0.9) if cls is ZNormSGD else dict(lr=1e-2)
    ours, theirs = make_model(), make_model()
    opt = cls(ours.parameters(), fused=True, track_stats=True, **kwargs)
    ref = torch_cls(theirs.parameters(), fused=True, **kwargs)
    znorm_kernels.register(ref)
    data = batches(3)
    for model, o in ((ours, opt), (theirs, ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for x, y in data:
            o.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            raw = [p.grad / 1024.0 for p in model.parameters()]
            scaler.step(o)
            scaler.update()
    assert_same_params(ours, theirs)
    stats = opt.grad_stats()
    for i, g in enumerate(raw):
        torch.testing.assert_close(stats.std[i], g.double().std(correction=0), atol=1e-7, rtol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend not available")
@pytest.mark.parametrize("cls, torch_cls", [(ZNormSGD, torch.optim.SGD), (ZNormAdamW, torch.optim.AdamW)])
def test_triton_takes_the_fused_step_where_it_can(monkeypatch, cls, torch_cls):
    # Group 0 takes the fused Triton update (statistics + one update launch, no scratch copy of the
    # gradients); group 1 has a tensor learning rate, which the fused kernel does not take: it goes through
    # the hook's kernel and torch's update. Both must equal the hook on torch's optimizer.
    from znorm_kernels.backends import triton_optim

    calls = []
    for table in (triton_optim.STEPS, triton_optim.STEADY_LAUNCHES):  # a full step's, a remembered step's
        for family, real in list(table.items()):
            monkeypatch.setitem(
                table, family, lambda *a, real=real, family=family, **k: calls.append(family) or real(*a, **k)
            )
    device = DEVICE_OF["triton"]
    ours, theirs = make_model(device=device), make_model(device=device)

    def groups(model):
        head = list(model[4].parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in head)]
        return [{"params": rest}, {"params": head, "lr": torch.tensor(0.02)}]

    kwargs = dict(lr=0.05, momentum=0.9) if cls is ZNormSGD else dict(lr=1e-2)
    opt = cls(groups(ours), backend="triton", **kwargs)
    ref = torch_cls(groups(theirs), **kwargs)
    znorm_kernels.register(ref, backend="triton")
    data = batches(3, device)
    train(ours, opt, data)
    train(theirs, ref, data)
    assert len(calls) == 3, "one fused update launch per step, for group 0"
    scratch_of = {id(p) for p in ours[4].parameters()}
    assert set(opt._znorm_scratch) == scratch_of, "scratch buffers only for the group torch updated"
    assert_same_params(ours, theirs, **FUSED_TOL[device])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize(
    "cls, torch_cls, kwargs",
    [
        (ZNormSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        (ZNormAdam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
        (ZNormAdamW, torch.optim.AdamW, dict(lr=1e-2, maximize=True)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_fused_step_matches_hook_on_torch(cls, torch_cls, kwargs, dtype):
    ours, theirs = make_model().cuda().to(dtype), make_model().cuda().to(dtype)
    opt = cls(ours.parameters(), **kwargs)
    ref = torch_cls(theirs.parameters(), **kwargs)
    znorm_kernels.register(ref)
    data = [(x.cuda().to(dtype), y.cuda()) for x, y in batches(4)]
    train(ours, opt, data)
    train(theirs, ref, data)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_same_params(ours, theirs, **tol)
    assert not opt._znorm_scratch, "the fused step ran (no scratch copies)"


@needs_cuda
def test_on_cuda_a_captured_znorm_sgd_step_replays_like_eager():
    model, twin = make_model().cuda(), make_model().cuda()
    opt = ZNormSGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = ZNormSGD(twin.parameters(), lr=0.05, momentum=0.9)
    data = [(x.cuda(), y.cuda()) for x, y in batches(6)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: momentum buffers, plans
        train(model, opt, data[:2])
    torch.cuda.current_stream().wait_stream(side)
    train(twin, ref, data[:2])
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        nn.functional.cross_entropy(model(static_x), static_y).backward()
        opt.step()
    for x, y in data[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train(twin, ref, [(x, y)])
    torch.cuda.synchronize()
    assert_same_params(model, twin, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_step_layout_follows_changes_between_steps(backend):
    # The fused step keeps what it derived from a group's parameters while they and their gradients'
    # addresses stay the same; a changed min_ndim, a gradient that disappears and a new gradient tensor must
    # each be seen. Reference: torch's SGD on gradients the library normalizes first (>= min_ndim dims).
    device = DEVICE_OF[backend]
    ours, theirs = make_model(device=device), make_model(device=device)
    opt = ZNormSGD(ours.parameters(), lr=0.05, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    min_ndim = 1
    for step, (x, y) in enumerate(batches(5, device)):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad(set_to_none=False)  # the same gradient tensors, at the same addresses
            nn.functional.cross_entropy(model(x), y).backward()
            if step == 3:
                model[1].bias.grad = None  # a gradient that disappears
            if step == 4:
                model[4].weight.grad = model[4].weight.grad.clone()  # a new tensor at another address
        if step == 2:
            min_ndim = opt.param_groups[0]["min_ndim"] = 2
        opt.step()
        grads = [p.grad for p in theirs.parameters() if p.grad is not None and p.dim() >= min_ndim]
        znorm_kernels.znorm_(grads, backend=backend)
        ref.step()
        assert_same_params(ours, theirs, **FUSED_TOL[device])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_step_checks_again_when_a_gradient_moves(backend):
    # Rule 11 on the fused step: gradients that come to share part of their memory are refused, nothing
    # modified, even after earlier steps with the same parameters.
    device = DEVICE_OF[backend]
    a, b = nn.Parameter(torch.randn(8, device=device)), nn.Parameter(torch.randn(8, device=device))
    opt = ZNormSGD([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.randn(8, device=device), torch.randn(8, device=device)
    opt.step()
    buf = torch.randn(12, device=device)
    a.grad, b.grad = buf[:8], buf[4:]
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match="share part of their memory"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("cls, torch_cls", [(ZNormSGD, torch.optim.SGD), (ZNormAdam, torch.optim.Adam)])
def test_fused_step_sees_a_new_layout_at_the_same_address(backend, cls, torch_cls):
    # A .grad assigned by hand as a transposed view of the same memory keeps every address the fused step
    # remembered: only its strides tell. Reading it as the old contiguous gradient would apply it transposed.
    device = DEVICE_OF[backend]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, generator=gen).to(device)
    ours, theirs = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    kwargs = dict(lr=0.1, momentum=0.9) if cls is ZNormSGD else dict(lr=1e-2)
    opt = cls([ours], backend=backend, **kwargs)
    ref = torch_cls([theirs], **kwargs)
    znorm_kernels.register(ref, backend=backend)
    for step in range(3):
        g = torch.randn(6, 6, generator=gen).to(device)
        if step < 2:
            ours.grad, theirs.grad = g.clone(), g.clone()
        else:  # the same memory as the last step's gradient, now read transposed
            ours.grad.copy_(g)
            theirs.grad.copy_(g)
            ours.grad, theirs.grad = ours.grad.t(), theirs.grad.t()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours, theirs, **FUSED_TOL[device])


# --- the fused step's remembered step (optim/fused.py, _Remembered): what it keeps must follow changes ---


def _remembered_pair(backend, cls, torch_cls, kwargs, mutate, steps=5, full_reference=False):
    """Steps of ``cls`` and of ``register(torch_cls)`` on the same gradients, ``mutate(step, opt, ps)``
    applied to both before each step (``ps``: that optimizer's parameters); parameters compared each step.
    ``full_reference``: the reference is ``cls`` itself with its remembered step turned off (for the ZNorm
    options the hook does not read). Returns the ZNorm optimizer (its remembered steps are counted in
    ``opt.remembered_steps``)."""
    device = DEVICE_OF[backend]
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (5,), (2, 3, 2)]
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ours, theirs = [nn.Parameter(t.clone()) for t in init], [nn.Parameter(t.clone()) for t in init]
    opt = cls(ours, backend=backend, **kwargs)
    if full_reference:
        ref = cls(theirs, backend=backend, **kwargs)
    else:
        ref = torch_cls(theirs, **kwargs)
        znorm_kernels.register(ref, backend=backend)
    from znorm_kernels.optim import fused

    opt.remembered_steps = 0
    original = fused.remembered_step_

    def counting(*args, **kw):
        if args[0] is ref:
            return None
        done = original(*args, **kw)
        opt.remembered_steps += bool(done) and args[0] is opt
        return done

    fused.remembered_step_ = counting
    buffers = {}  # the gradients at the same addresses every step, as a training loop has them
    try:
        for step in range(steps):
            for o, ps in ((opt, ours), (ref, theirs)):
                ps = o.param_groups[0]["params"]
                gen_step = torch.Generator().manual_seed(100 + step)
                for p in ps:
                    g = torch.randn(p.shape, generator=gen_step).to(device)
                    p.grad = buffers.setdefault(id(p), torch.empty_like(p)).copy_(g)
                mutate(step, o, ps)
            opt.step()
            ref.step()
            for a, b in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
                torch.testing.assert_close(a, b, **FUSED_TOL[device])
    finally:
        fused.remembered_step_ = original
    return opt


FUSED_BACKENDS = [b for b in BACKENDS if b != "reference"]
SGD_AND_ADAM = [
    (ZNormSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (ZNormAdam, torch.optim.Adam, dict(lr=1e-2)),
    (ZNormAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls, torch_cls, kwargs", SGD_AND_ADAM)
def test_remembered_step_is_taken_and_reads_hyperparameters_each_step(backend, cls, torch_cls, kwargs):
    def mutate(step, opt, ps):
        group = opt.param_groups[0]
        group["lr"] = 0.1 / (step + 1)
        group["weight_decay"] = 0.01 * step
        if "betas" in group and step == 3:
            group["betas"] = (0.8, 0.99)
        if "momentum" in group and step == 3:
            group["dampening"], group["nesterov"] = 0.0, True

    opt = _remembered_pair(backend, cls, torch_cls, kwargs, mutate)
    assert opt.remembered_steps >= 3  # steps after the first: the remembered step served them


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(
    "cls, torch_cls, kwargs",
    [*SGD_AND_ADAM, (ZNormSGD, torch.optim.SGD, dict(lr=0.1))],  # no state to miss
)
def test_remembered_step_sees_a_parameter_added_to_the_group(backend, cls, torch_cls, kwargs):
    def mutate(step, opt, ps):
        if step == 2:
            p = nn.Parameter(torch.arange(6.0, device=ps[0].device).view(2, 3))
            p.grad = torch.ones(2, 3, device=p.device).cumsum(1)
            opt.param_groups[0]["params"].append(p)

    _remembered_pair(backend, cls, torch_cls, kwargs, mutate)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls, torch_cls, kwargs", SGD_AND_ADAM)
def test_remembered_step_sees_state_loaded_and_state_replaced(backend, cls, torch_cls, kwargs):
    saved = {}

    def mutate(step, opt, ps):
        if step == 1:
            saved[id(opt)] = copy.deepcopy(opt.state_dict())
        if step == 3:  # back to the state of step 1 (other tensors, older step counts)
            opt.load_state_dict(saved[id(opt)])
        if step == 4:  # one state tensor replaced by hand, at another address
            state = opt.state[ps[0]]
            key = "momentum_buffer" if "momentum_buffer" in state else "exp_avg"
            state[key] = state[key].clone() * 0.5

    _remembered_pair(backend, cls, torch_cls, kwargs, mutate, steps=6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls, torch_cls, kwargs", SGD_AND_ADAM[1:])
def test_remembered_step_follows_step_counts_that_diverge(backend, cls, torch_cls, kwargs):
    def mutate(step, opt, ps):
        if step == 1:
            ps[1].grad = None  # its step count now lags the others'
        if step == 3:
            opt.state[ps[2]]["step"].fill_(10.0)  # a count changed in place, same tensor
        if step == 5:
            for p in ps:
                opt.state[p]["step"].fill_(7.0)  # equal again

    opt = _remembered_pair(backend, cls, torch_cls, kwargs, mutate, steps=7)
    assert opt.remembered_steps >= 3
    steps = [float(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]]
    assert steps == [9.0, 9.0, 9.0]  # 7, then steps 5 and 6


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls, torch_cls, kwargs", SGD_AND_ADAM)
def test_remembered_step_sees_a_parameter_moved_and_options_changed(backend, cls, torch_cls, kwargs):
    def mutate(step, opt, ps):
        group = opt.param_groups[0]
        if step == 1:
            ps[0].data = ps[0].data.clone()  # the parameter's memory moves
        if step == 2:
            group["min_ndim"] = 2  # fewer parameters treated
        if step == 3:
            group["znorm"] = False
        if step == 4:
            group["znorm"] = True
            if "momentum" in group:
                group["momentum"] = 0.0  # no momentum buffer read any more
            else:
                group["amsgrad"] = not group["amsgrad"]
                if group["amsgrad"]:
                    for p in ps:
                        opt.state[p].setdefault("max_exp_avg_sq", torch.zeros_like(p))

    _remembered_pair(backend, cls, torch_cls, kwargs, mutate, steps=6, full_reference=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_grad_stats_after_a_parameter_without_gradient_joins_a_group(backend):
    # The fused step's remembered layout sees only parameters with a gradient; a parameter appended to the
    # group without one must still get its name (and a NaN row) in the statistics.
    device = DEVICE_OF[backend]
    a = nn.Parameter(torch.randn(4, 3, device=device))
    opt = ZNormAdam([a], lr=0.1, backend=backend, track_stats=True)
    a.grad = torch.randn(4, 3, device=device)
    for _ in range(2):
        a.grad.copy_(torch.randn(4, 3, device=device))
        opt.step()
    b = nn.Parameter(torch.randn(5, 2, device=device))
    opt.param_groups[0]["params"].append(b)
    a.grad.copy_(torch.randn(4, 3, device=device))
    opt.step()
    stats = opt.grad_stats()
    assert len(stats.names) == 2 and stats.values.shape == (2, 2)
    assert stats.values[1].isnan().all() and not stats.values[0].isnan().any()


# --- the general path's pieces, and what the fused step keeps and refuses ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_step_hooks_run_once_per_step(backend):
    # torch wraps an optimizer class's step with its hook runner once an instance exists; our step is
    # wrapped already, so the torch step it calls inside must be the unwrapped one (hooks run once).
    device = DEVICE_OF[backend]
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # torch.optim.SGD.step now carries the wrapper
    w = nn.Parameter(torch.randn(4, 3, device=device))
    opt = ZNormSGD([{"params": [w]}], lr=0.1, backend=backend)
    opt.param_groups[0]["lr"] = torch.tensor(0.1)  # a tensor lr: the general path, on every backend
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(2):
        w.grad = torch.randn(4, 3, device=device)
        opt.step()
    assert calls == ["pre", "post"] * 2


def test_general_path_scratch_gradient_follows_the_gradient_and_is_reused(monkeypatch):
    # Without normalize_grad the z-scores go to a buffer that stands in for .grad during torch's update: it
    # has the gradient's shape, dtype and strides (as torch's optimizers expect), and while those stay the
    # same one buffer serves every step (no allocation per step). What torch's update reads is recorded.
    seen = []
    torch_step = torch.optim.SGD.step

    def recording(self, closure=None):
        seen.append(self.param_groups[0]["params"][0].grad)
        return torch_step(self, closure)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    p = nn.Parameter(torch.randn(4, 6))
    opt = ZNormSGD([p], lr=0.1, backend="reference")
    gen = torch.Generator().manual_seed(0)
    changes = [
        lambda: torch.randn(4, 6, generator=gen),
        lambda: torch.randn(4, 6, generator=gen),  # a new gradient tensor of the same layout
        lambda: torch.randn(6, 4, generator=gen).t(),  # other strides only
        lambda: torch.randn(4, 6, generator=gen),  # back to the first strides
        lambda: torch.randn(4, 6, generator=gen, dtype=torch.float64),  # another dtype only
        lambda: torch.randn(5, 6, generator=gen, dtype=torch.float64),  # another shape, same strides
    ]
    for step, make in enumerate(changes):
        g = make()
        if g.shape != p.shape or g.dtype != p.dtype:
            p.data = torch.randn(g.shape, generator=gen, dtype=g.dtype)
        p.grad = g
        before, raw = p.detach().clone(), g.clone()
        opt.step()
        z = seen[-1]
        assert z is not g and p.grad is g and torch.equal(g, raw), "the raw gradient, untouched"
        assert (z.shape, z.dtype, z.stride()) == (g.shape, g.dtype, g.stride())
        if step:
            assert (z is seen[-2]) == (step == 1), "the buffer is reused exactly where nothing changed"
        want = float64_znorm_of(raw)
        torch.testing.assert_close(p.detach().double(), before.double() - 0.1 * want, atol=1e-6, rtol=0)


def float64_znorm_of(g):
    g = g.double()
    return (g - g.mean()) / (g.std(correction=0) + 1e-10)


@pytest.mark.parametrize("track_stats", [False, True])
def test_general_path_keeps_one_gradient_groups_per_eps_and_correction(monkeypatch, track_stats):
    # The general path's normalizer (its cached plan) is made once per (znorm_eps, correction), with a
    # statistics buffer only where track_stats asks for one, and reused step after step.
    from znorm_kernels.optim import base

    made = []
    real = base.GradientGroups

    def counting(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(base, "GradientGroups", counting)
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    opt = ZNormSGD(
        [{"params": [a]}, {"params": [b], "znorm_eps": 1e-6}],
        lr=0.1,
        backend="reference",
        track_stats=track_stats,
    )
    for _ in range(3):
        a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
        opt.step()
    assert [(g.eps, g.correction) for g in made] == [(1e-10, 0.0), (1e-6, 0.0)]
    assert [g.stats is not None for g in made] == [track_stats] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_stats_joins_every_group_and_path(backend):
    # Statistics from several parts (two (eps, correction) keys of the general path, or a fused group beside
    # a general one) come back as one GradStats, in group order, named "group<i>.param<k>".
    device = DEVICE_OF[backend]
    gen = torch.Generator().manual_seed(2)
    ps = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in ((4, 3), (5,), (2, 6))]
    opt = ZNormSGD(
        [{"params": ps[:2]}, {"params": ps[2:], "znorm_eps": 1e-6}], lr=0.1, backend=backend, track_stats=True
    )
    if backend != "reference":
        opt.param_groups[1]["lr"] = torch.tensor(0.1)  # group 1 on the general path, group 0 fused
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 3 + 1
    raw = [p.grad.double().cpu() for p in ps]
    opt.step()
    stats = opt.grad_stats()
    assert stats.names == ["group0.param0", "group0.param1", "group1.param0"]
    want = torch.tensor([[g.mean(), g.std(correction=0)] for g in raw], dtype=torch.float64)
    torch.testing.assert_close(stats.values.cpu(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_step_normalizes_a_two_element_tensor(backend):
    # Two elements are the fewest ZNorm normalizes: (1, 3) has mean 2 and population std 1, z = (-1, 1).
    device = DEVICE_OF[backend]
    p = nn.Parameter(torch.zeros(2, device=device))
    opt = ZNormSGD([p], lr=0.5, backend=backend)
    p.grad = torch.tensor([1.0, 3.0], device=device)
    opt.step()
    torch.testing.assert_close(p.detach().cpu(), torch.tensor([0.5, -0.5]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_step_sees_a_parameter_reshaped_at_the_same_address(backend):
    # A parameter's .data replaced by a 1-D tensor, its gradient a 1-D view of the same memory: every id
    # and address the fused step keeps is unchanged, only the layout tells that min_ndim=2 now leaves the
    # parameter alone (raw gradient).
    device = DEVICE_OF[backend]
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(4, 3, generator=gen).to(device))
    opt = ZNormSGD([p], lr=0.1, min_ndim=2, backend=backend)
    p.grad = torch.randn(4, 3, generator=gen).to(device)
    before, raw = p.detach().clone(), p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * float64_znorm_of(raw).float(), **FUSED_TOL[device])
    p.data = torch.randn(12, generator=gen).to(device)
    p.grad = p.grad.view(12)
    p.grad.copy_(torch.randn(12, generator=gen))
    before, raw = p.detach().clone(), p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * raw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(
    "change, fused",
    [
        (dict(), True),
        (dict(group=dict(differentiable=True)), False),
        (dict(group=dict(capturable=True)), False),
        (dict(group=dict(fused=True)), False),
        (dict(group=dict(lr=torch.tensor(0.1))), False),
        (dict(amp=True, grad_scale=torch.tensor(2.0)), False),  # a GradScaler's pending scale
        (dict(amp=True), True),  # amp scaling supported, no scale handed over
        (dict(grad_scale=torch.tensor(2.0)), True),  # no amp scaling support: not a GradScaler's scale
    ],
    ids=[
        "plain",
        "differentiable",
        "capturable",
        "fused",
        "tensor-lr",
        "grad-scale",
        "amp-no-scale",
        "scale",
    ],
)
def test_fused_step_takes_a_group_only_where_its_options_allow(backend, change, fused):
    # try_fused_step_ either does the whole step of the group (True) or nothing at all (False, for the
    # general path); the options are read at every step.
    from znorm_kernels.optim.fused import try_fused_step_

    device = DEVICE_OF[backend]
    p = nn.Parameter(torch.randn(4, 3, device=device))
    opt = ZNormSGD([p], lr=0.1, momentum=0.9, backend=backend)
    group = opt.param_groups[0]
    group.update(change.get("group", {}))
    if "amp" in change:
        opt._step_supports_amp_scaling = True
    if "grad_scale" in change:
        opt.grad_scale = change["grad_scale"].to(device)
    p.grad = torch.randn(4, 3, device=device)
    before = p.detach().clone()
    names = lambda: ["w"]
    done = try_fused_step_(opt, opt._znorm, opt._znorm_fused, group, opt._fused_kind, names, [])
    assert done is fused
    assert torch.equal(p, before) is not fused
    assert ("momentum_buffer" in opt.state[p]) is fused


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_step_caches_stay_bounded(backend):
    # What the fused step keeps per param group (layouts, checked tensors) is dropped once it holds 64
    # entries: an optimizer with many groups, or groups made and dropped, does not grow it without bound.
    # 65 groups: the 65th entry finds 64.
    device = DEVICE_OF[backend]
    ps = [nn.Parameter(torch.randn(3, device=device)) for _ in range(65)]
    opt = ZNormSGD([{"params": [p]} for p in ps], lr=0.1, backend=backend)
    for p in ps:
        p.grad = torch.randn(3, device=device)
    opt.step()
    caches = opt._znorm_fused
    assert 0 < len(caches.layouts) <= 64 and 0 < len(caches.validated) <= 64


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_remembered_step_serves_sgd_without_momentum_and_with_momentum_one(backend, momentum):
    # momentum 0: torch keeps no momentum buffer, and the remembered step needs none; momentum 1: a
    # buffer like any other (the edge of "momentum != 0").
    opt = _remembered_pair(
        backend, ZNormSGD, torch.optim.SGD, dict(lr=0.1, momentum=momentum), lambda *_: None
    )
    assert opt.remembered_steps >= 3
    for p in opt.param_groups[0]["params"]:
        assert ("momentum_buffer" in opt.state[p]) is (momentum != 0), "torch's state format"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls, torch_cls", [(ZNormAdam, torch.optim.Adam), (ZNormAdamW, torch.optim.AdamW)])
def test_fused_step_counters_take_torchs_dtype_under_a_half_default_dtype(backend, cls, torch_cls):
    # torch's Adam makes its step counters float32 unless the default dtype is float64; under a bfloat16
    # default a counter of the default dtype would stop counting at 256.
    device = DEVICE_OF[backend]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ours = nn.Parameter(torch.randn(4, 3, dtype=torch.float32, device=device))
        theirs = nn.Parameter(ours.detach().clone())
        opt, ref = cls([ours], lr=1e-2, backend=backend), torch_cls([theirs], lr=1e-2)
        for o, p in ((opt, ours), (ref, theirs)):
            p.grad = torch.ones(4, 3, dtype=torch.float32, device=device)
            o.step()
    finally:
        torch.set_default_dtype(old)
    assert opt.state[ours]["step"].dtype == ref.state[theirs]["step"].dtype == torch.float32


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("full_steps", [False, True], ids=["remembered", "full"])
def test_grad_stats_name_parameters_added_after_the_layout(monkeypatch, backend, full_steps):
    # The fused step's layout knows the names of the group's parameters when it was made; parameters added
    # later (without a gradient: the layout still holds) take their names from the group. The names are
    # read once per group while nothing is added. ``full_steps``: the remembered step turned off.
    from znorm_kernels.optim import base, fused

    if full_steps:
        monkeypatch.setattr(fused, "remembered_step_", lambda *args, **kw: None)
    reads = count_calls(monkeypatch, base, "_param_names")
    device = DEVICE_OF[backend]
    a = nn.Parameter(torch.randn(5, device=device))  # 1-D: not selected with min_ndim=2
    c = nn.Parameter(torch.randn(2, 4, device=device))
    opt = ZNormAdam([{"params": [a]}, {"params": [c]}], lr=0.1, min_ndim=2, backend=backend, track_stats=True)
    a.grad, c.grad = torch.zeros_like(a), torch.zeros_like(c)
    for _ in range(3):  # new gradients at the same addresses, as a training loop has them
        a.grad.copy_(torch.randn(5)), c.grad.copy_(torch.randn(2, 4))
        opt.step()
    assert len(reads) == 2, "the names, read once per group for its layout"
    assert opt.grad_stats().names == ["group1.param0"]
    b = nn.Parameter(torch.randn(2, 3, device=device))
    opt.param_groups[0]["params"].append(b)  # group 0's only selected parameter, unknown to its layout
    opt.step()
    stats = opt.grad_stats()
    assert stats.names == ["group0.param1", "group1.param0"]
    assert stats.values[0].isnan().all() and not stats.values[1].isnan().any()
