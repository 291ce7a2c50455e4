"""The optimizer hook: same training as applying the reference by hand, once per step, AMP-aware."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import znorm_kernels
from tests.utils import count_calls
from znorm_kernels import reference


def small_net(seed: int = 0) -> nn.Module:
    # No bias before BatchNorm: its true gradient is zero, and ZNorm of rounding noise is noise.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def make_opt(kind: str, params, **kw):
    if kind == "sgdm":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, **kw)
    return torch.optim.Adam(params, lr=1e-3, **kw)


def grads_of(opt, min_ndim=1):
    return [
        p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None and p.dim() >= min_ndim
    ]


@pytest.mark.parametrize("kind", ["sgdm", "adam"])
@pytest.mark.parametrize("min_ndim", [1, 2, 4])
def test_training_with_hook_equals_reference_by_hand(kind, min_ndim):
    net_a, net_b = small_net(), small_net()
    opt_a, opt_b = make_opt(kind, net_a.parameters()), make_opt(kind, net_b.parameters())
    znorm_kernels.register(opt_a, min_ndim=min_ndim)
    for x, y in batches(4):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        reference.znorm_(grads_of(opt_b, min_ndim))
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    # And the hook really did something: training without it differs.
    net_c = small_net()
    opt_c = make_opt(kind, net_c.parameters())
    for x, y in batches(4):
        opt_c.zero_grad()
        nn.functional.cross_entropy(net_c(x), y).backward()
        opt_c.step()
    assert not all(torch.allclose(pa, pc) for pa, pc in zip(net_a.parameters(), net_c.parameters()))


def test_hook_leaves_thinner_params_alone():
    net = small_net()
    opt = make_opt("sgdm", net.parameters())
    znorm_kernels.register(opt, min_ndim=2)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p.grad, before[n]), n
        else:
            assert not torch.equal(p.grad, before[n]), n


def test_params_selects_a_subset_and_accepts_names():
    net = small_net()
    opt = make_opt("adam", net.parameters())
    chosen = [("0.weight", net[0].weight), ("7.weight", net[7].weight)]
    znorm_kernels.register(opt, params=chosen)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    expected = {n: g.clone() for n, g in before.items()}
    reference.znorm_([expected["0.weight"], expected["7.weight"]])
    opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0, msg=n)


def test_names_given_with_params_name_the_parameter_in_errors():
    # The optimizer knows no names here: the ones given to register() are what the error reports.
    net = small_net()
    opt = make_opt("sgdm", net.parameters())
    znorm_kernels.register(opt, params=[("first", net[0].weight), ("last", net[7].weight)])
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    net[7].weight.grad = net[7].weight.grad.to_sparse()
    with pytest.raises(TypeError, match=r"'last'"):
        opt.step()


_NOT_PAIRS = ["three", "no name", "name second", "a number", "a name alone", "a list pair", "a 3-list"]


@pytest.mark.parametrize("item", _NOT_PAIRS)
def test_params_entries_that_are_not_parameters_or_pairs_raise(item):
    net = small_net()
    w = net[0].weight
    bad = {
        "three": ("w", w, "x"),
        "no name": (w, w),
        "name second": (w, "w"),
        "a number": 3,
        "a name alone": "w",
        "a list pair": ["w", w],  # pairs are tuples, as named_parameters() gives them
        "a 3-list": ["w", w, "x"],
    }[item]
    opt = make_opt("sgdm", net.parameters())
    with pytest.raises(
        TypeError, match=r"^params\[1\] is a (tuple|int|str|list), expected a parameter tensor$"
    ):
        znorm_kernels.register(opt, params=[net[7].weight, bad])


def test_params_may_hold_zero_dim_parameters_alone_or_named():
    # A 0-d tensor has no len() and no [0]: it is taken as the parameter it is, not looked into.
    torch.manual_seed(0)
    w, s, t = (
        nn.Parameter(torch.randn(3, 2)),
        nn.Parameter(torch.tensor(0.5)),
        nn.Parameter(torch.tensor(1.0)),
    )
    opt = torch.optim.SGD([w, s, t], lr=0.0)
    handle = znorm_kernels.register(opt, min_ndim=0, params=[s, ("t", t), w], track_stats=True)
    w.grad, s.grad, t.grad = torch.randn(3, 2), torch.tensor(2.0), torch.tensor(3.0)
    expected = w.grad.clone()
    reference.znorm_tensor_(expected)
    opt.step()
    torch.testing.assert_close(w.grad, expected, atol=1e-6, rtol=0)
    assert (s.grad.item(), t.grad.item()) == (2.0, 3.0), "fewer than 2 elements: left as they are"
    assert handle.grad_stats().names == ["#0", "#1", "t"]


def test_params_not_in_optimizer_is_an_error():
    net, other = small_net(), small_net()
    opt = make_opt("sgdm", net.parameters())
    with pytest.raises(ValueError, match="not a parameter"):
        znorm_kernels.register(opt, params=other.parameters())


@pytest.mark.parametrize("kwargs", [{"min_ndim": -1}, {"eps": -1.0}, {"backend": "nope"}, {"correction": -2}])
def test_bad_registration_raises(kwargs):
    opt = make_opt("sgdm", small_net().parameters())
    with pytest.raises(ValueError):
        znorm_kernels.register(opt, **kwargs)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match=r"^expected a torch\.optim\.Optimizer, got object$"):
        znorm_kernels.register(object())
    with pytest.raises(TypeError, match=r"^expected a torch\.optim\.Optimizer, got Linear$"):
        znorm_kernels.register(nn.Linear(2, 2))


def test_once_per_step_with_gradient_accumulation():
    net_a = small_net()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = make_opt("sgdm", net_a.parameters()), make_opt("sgdm", net_b.parameters())
    znorm_kernels.register(opt_a)
    calls = []
    opt_a.register_step_pre_hook(lambda *a: calls.append(1))
    micro = batches(3)
    for net in (net_a, net_b):
        for x, y in micro:  # accumulate three micro-batches into .grad
            nn.functional.cross_entropy(net(x), y).backward()
    reference.znorm_(grads_of(opt_b))
    opt_a.step()
    opt_b.step()
    assert len(calls) == 1
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_step_with_closure_normalizes_the_gradients_the_closure_computes(how):
    net_a = small_net()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = make_opt("sgdm", net_a.parameters()), make_opt("sgdm", net_b.parameters())
    znorm_kernels.register(opt_a, backend="reference")  # the same computation as by hand: equal bits
    for x, y in batches(3):
        # Stale gradients before the step: the hook must neither normalize these nor let them through.
        for net in (net_a, net_b):
            net.zero_grad()
            nn.functional.cross_entropy(net(x * 2), y).backward()

        def closure(x=x, y=y):
            opt_a.zero_grad()
            loss = nn.functional.cross_entropy(net_a(x), y)
            loss.backward()
            return loss

        loss = opt_a.step(closure) if how == "positional" else opt_a.step(closure=closure)
        opt_b.zero_grad()
        expected = nn.functional.cross_entropy(net_b(x), y)
        expected.backward()
        reference.znorm_(grads_of(opt_b))
        opt_b.step()
        assert torch.equal(loss, expected)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
        assert torch.equal(pa, pb)


def test_lbfgs_sees_z_scores_at_every_closure_call():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    x = torch.randn(32, 4)
    target = torch.randn(32, 5)
    opt = torch.optim.LBFGS([w], lr=0.1, max_iter=4)
    znorm_kernels.register(opt)
    seen = []

    def closure():
        opt.zero_grad()
        loss = ((x @ w.t() - target) ** 2).mean()
        loss.backward()
        seen.append(w.grad)  # the tensor LBFGS reads after the closure returns
        return loss

    opt.step(closure)
    assert len(seen) > 1
    for g in seen:
        torch.testing.assert_close(g.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(g.std(correction=0), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_handle_remove_stops_it():
    net = small_net()
    opt = make_opt("sgdm", net.parameters())
    handle = znorm_kernels.register(opt)
    handle.remove()
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    before = [p.grad.clone() for p in net.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))


def test_add_param_group_is_seen():
    net = small_net()
    params = list(net.parameters())
    opt = make_opt("sgdm", params[:2])
    znorm_kernels.register(opt)
    opt.add_param_group({"params": params[2:]})
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    expected = [p.grad.clone() for p in params]
    reference.znorm_(expected)
    opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)


def test_grad_scaler_skips_inf_step_and_hook_sees_unscaled_grads():
    net = small_net()
    opt = make_opt("sgdm", net.parameters())
    znorm_kernels.register(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batches(1)[0]
    # A finite step: the hook sees unscaled gradients, so the result is the z-scores of the true gradients.
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    true = [p.grad / 1024.0 for p in net.parameters()]
    reference.znorm_(true)
    scaler.step(opt)
    scaler.update()
    for p, t in zip(net.parameters(), true):
        torch.testing.assert_close(p.grad, t, atol=1e-5, rtol=0)
    # An inf step: GradScaler skips optimizer.step(), so the hook does not run and nothing moves.
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    net[0].weight.grad[0, 0, 0, 0] = float("inf")
    weights = [p.detach().clone() for p in net.parameters()]
    scaled = [p.grad.clone() for p in net.parameters()]
    scaler.step(opt)
    for p, w, g in zip(net.parameters(), weights, scaled):
        assert torch.equal(p, w)  # the step was skipped
        # left as unscale_ left them (1024 is a power of two: exact), not normalized
        assert torch.equal(p.grad, g / 1024.0)


@pytest.mark.parametrize("kind", ["sgdm", "adam"])
def test_fused_optimizer_with_grad_scaler_gets_scaled_z_scores(kind):
    # GradScaler leaves the gradients scaled for fused optimizers; the hook must keep them scaled so the
    # optimizer's own unscaling yields the z-scores: same result as the unfused optimizer on z-scores.
    net_a, net_b = small_net(), small_net()
    opt_a = make_opt(kind, net_a.parameters(), fused=True)
    opt_b = make_opt(kind, net_b.parameters())
    assert opt_a._step_supports_amp_scaling
    znorm_kernels.register(opt_a)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    for x, y in batches(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        scaler.scale(nn.functional.cross_entropy(net_a(x), y)).backward()
        nn.functional.cross_entropy(net_b(x), y).backward()
        reference.znorm_(grads_of(opt_b))
        scaler.step(opt_a)
        scaler.update()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_state_dict_round_trips_unchanged():
    net_a, net_b = small_net(), small_net()
    opt_a, opt_b = make_opt("adam", net_a.parameters()), make_opt("adam", net_b.parameters())
    znorm_kernels.register(opt_a)
    for x, y in batches(2):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    sd = opt_a.state_dict()
    assert sd.keys() == opt_b.state_dict().keys()
    assert sd["param_groups"] == opt_b.state_dict()["param_groups"]
    assert set(sd["state"][0]) == set(opt_b.state_dict()["state"][0])
    fresh = make_opt("adam", small_net().parameters())
    znorm_kernels.register(fresh)
    fresh.load_state_dict(copy.deepcopy(sd))
    sd2 = fresh.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]
    for k in sd["state"]:
        for name, v in sd["state"][k].items():
            assert torch.equal(sd2["state"][k][name], v)


def test_error_names_parameter_from_named_optimizer():
    net = small_net()
    opt = torch.optim.SGD(net.named_parameters(), lr=0.1)
    znorm_kernels.register(opt)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    net[7].weight.grad = net[7].weight.grad.to_sparse()
    with pytest.raises(TypeError, match=r"7\.weight"):
        opt.step()


def test_unchanged_gradients_skip_revalidation_and_changes_are_caught(monkeypatch):
    from znorm_kernels import dispatch

    calls = count_calls(monkeypatch, dispatch, "collect_indices")
    net = small_net()
    opt = make_opt("sgdm", net.parameters())
    znorm_kernels.register(opt)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad(set_to_none=False)  # same gradient tensors, same addresses
        nn.functional.cross_entropy(net(x), y).backward()
        expected = [p.grad.clone() for p in net.parameters()]
        for e in expected:
            reference.znorm_tensor_(e)  # not through the dispatcher, whose checks are counted
        opt.step()
        for p, e in zip(net.parameters(), expected):
            torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=0)
    assert len(calls) == 1, "unchanged gradients are checked once"
    # A gradient that turns sparse or disappears takes the full path again, with its error or skip.
    net[7].bias.grad = None
    opt.step()
    assert len(calls) == 2
    net[7].weight.grad = net[7].weight.grad.to_sparse()
    with pytest.raises(TypeError, match="position"):
        opt.step()


def test_hook_keeps_gradient_statistics_on_request():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
    opt = torch.optim.SGD(net.named_parameters(), lr=0.1)
    handle = znorm_kernels.register(opt, backend="reference", track_stats=True, min_ndim=2)
    assert handle.grad_stats() is None
    net(torch.randn(4, 6)).sum().backward()
    raw = {n: p.grad.double().clone() for n, p in net.named_parameters()}
    opt.step()
    stats = handle.grad_stats()
    assert stats.names == ["0.weight", "2.weight"], "the treated parameters (min_ndim=2)"
    for i, name in enumerate(stats.names):
        torch.testing.assert_close(stats.mean[i], raw[name].mean(), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(stats.std[i], raw[name].std(correction=0), atol=1e-12, rtol=1e-9)
    handle.remove()
    assert not opt._optimizer_step_pre_hooks, "remove() takes the hook out"
    plain = znorm_kernels.register(opt)
    with pytest.raises(
        RuntimeError, match=r"^gradient statistics are kept only with register\(\.\.\., track_stats=True\)$"
    ):
        plain.grad_stats()


def test_a_group_given_another_list_of_as_many_parameters_is_seen():
    # The selection is cached per param group list: a list replaced by another of the same length is new.
    torch.manual_seed(0)
    old, new = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(2, 5))
    opt = torch.optim.SGD([old], lr=0.0)
    znorm_kernels.register(opt, min_ndim=2)
    old.grad = torch.randn(4, 3)
    opt.step()
    opt.param_groups[0]["params"] = [new]
    old.grad, new.grad = torch.randn(4, 3), torch.randn(2, 5)
    untouched, expected = old.grad.clone(), new.grad.clone()
    reference.znorm_tensor_(expected)
    opt.step()
    torch.testing.assert_close(new.grad, expected, atol=1e-6, rtol=0)
    assert torch.equal(old.grad, untouched)


def test_selection_is_kept_while_the_param_groups_stay_the_same():
    from znorm_kernels.step_hooks import ParamSelector

    w, b, extra = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([w, b], lr=0.1)
    selector = ParamSelector(opt, 1, None)
    first = selector.select()
    assert first == ([w, b], ["", ""])
    second = selector.select()
    assert second[0] is first[0] and second[1] is first[1], "no new selection for unchanged groups"
    opt.add_param_group({"params": [extra]})
    assert selector.select()[0] == [w, b, extra]


class _Tagged(torch.optim.Optimizer):
    """A bare optimizer whose step() takes an argument after the closure, and records what it got."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None, tag=None):
        loss = closure() if closure is not None else None
        self.seen.append((tag, [p.grad.clone() for g in self.param_groups for p in g["params"]]))
        return loss


def test_register_grad_hook_selects_and_passes_step_arguments_through():
    from znorm_kernels.step_hooks import register_grad_hook

    w, b, s = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.tensor(1.0))
    opt = _Tagged([w, b, s])
    calls = []
    handle = register_grad_hook(opt, lambda params, grads, names, scale: calls.append((params, scale)))
    only_w = register_grad_hook(
        opt, lambda params, grads, names, scale: calls.append((params, scale)), params=[w]
    )

    def closure():
        for p in (w, b, s):
            p.grad = torch.ones_like(p)
        return 7.0

    assert opt.step(closure, "tagged") == 7.0
    assert opt.seen[-1][0] == "tagged", "step()'s arguments after the closure reach it unchanged"
    assert [c[0] for c in calls] == [[w, b], [w]], "min_ndim 1 by default; params when given"
    assert all(c[1] is None for c in calls)
    # An optimizer that unscales in its own step, with a scale pending: the transform gets it, closure or not.
    calls.clear()
    opt._step_supports_amp_scaling, opt.grad_scale = True, torch.tensor(8.0)
    opt.step(closure)
    opt.step()
    assert len(calls) == 4 and all(c[1] is opt.grad_scale for c in calls)
    handle.remove()
    only_w.remove()


def test_grad_scale_of_reads_only_optimizers_that_unscale_in_their_step():
    from znorm_kernels.step_hooks import grad_scale_of

    opt = torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1)
    # GradScaler unscales such an optimizer's gradients before its step: an attribute of that name is not a
    # pending scale.
    opt.grad_scale = torch.tensor(4.0)
    assert grad_scale_of(opt) is None
    opt._step_supports_amp_scaling = True
    assert grad_scale_of(opt) is opt.grad_scale
