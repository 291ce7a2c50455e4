"""The dispatch layer: input checks (clear errors, nothing modified), grouping, backend choice."""

from __future__ import annotations

import pytest
import torch

import znorm_kernels
from tests.utils import known_backends, make_grad
from znorm_kernels import registry, validation


def _good_list():
    return [make_grad((4, 5), seed=1), make_grad((30,), torch.float16, seed=2), make_grad((9,), seed=3)]


def _bad_entries():
    sparse = torch.randn(4, 4).to_sparse()
    csr = torch.randn(4, 4).to_sparse_csr()
    return {
        "sparse_coo": (sparse, TypeError, "sparse"),
        "sparse_csr": (csr, TypeError, "sparse"),
        "complex": (torch.randn(8, dtype=torch.complex64), TypeError, "complex"),
        "int": (torch.arange(8), TypeError, "dtype"),
        "bool": (torch.ones(8, dtype=torch.bool), TypeError, "dtype"),
        "not_a_tensor": ([1.0, 2.0], TypeError, "expected a Tensor"),
        "expanded": (torch.randn(3, 1).expand(3, 4), ValueError, "share memory"),
    }


@pytest.mark.parametrize("kind", list(_bad_entries()))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_entry_raises_naming_position_and_modifies_nothing(kind, backend):
    bad, exc, words = _bad_entries()[kind]
    grads = _good_list()
    grads.insert(2, bad)
    before = [g.clone() for g in grads if isinstance(g, torch.Tensor)]
    with pytest.raises(exc, match=rf"position 2.*{words}|{words}.*position 2"):
        znorm_kernels.znorm_(grads, backend=backend)
    after = [g for g in grads if isinstance(g, torch.Tensor)]
    for a, b in zip(after, before):
        assert torch.equal(
            a.to_dense() if a.layout != torch.strided else a, b.to_dense() if b.layout != torch.strided else b
        )


def test_error_names_the_parameter_when_known():
    grads = [torch.randn(3), torch.randn(3, dtype=torch.complex64)]
    with pytest.raises(TypeError, match=r"position 1 \(parameter 'fc.weight'\)"):
        znorm_kernels.znorm_(grads, names=["fc.bias", "fc.weight"])


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"eps": -1.0}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"eps": "1e-10"}, ValueError),
        ({"correction": -1}, ValueError),
        ({"correction": True}, ValueError),
        ({"backend": "fastest"}, ValueError),
        ({"backend": None}, TypeError),
    ],
)
def test_bad_options_raise_before_anything_changes(kwargs, exc):
    grads = _good_list()
    before = [g.clone() for g in grads]
    with pytest.raises(exc):
        znorm_kernels.znorm_(grads, **kwargs)
    for a, b in zip(grads, before):
        assert torch.equal(a, b)


# The exact messages users see, the op, the position and the parameter's name included.
SHARED = "an in-place normalization needs distinct elements"
MESSAGES = {
    "sparse_coo": "is sparse (torch.sparse_coo); ZNorm needs dense gradients",
    "sparse_csr": "is sparse (torch.sparse_csr); ZNorm needs dense gradients",
    "complex": "is complex (torch.complex64); ZNorm needs real gradients",
    "int": "has dtype torch.int64; supported: float32, float16, bfloat16, float64",
    "bool": "has dtype torch.bool; supported: float32, float16, bfloat16, float64",
    "not_a_tensor": "is a list, expected a Tensor or None",
    "expanded": f"has elements that share memory (e.g. made by expand()); {SHARED}",
}


@pytest.mark.parametrize("kind", list(_bad_entries()))
@pytest.mark.parametrize("named", [False, True])
def test_bad_entry_messages_name_the_op_position_and_parameter(kind, named):
    bad, exc, _ = _bad_entries()[kind]
    names = ["a", "b", "fc.weight"] if named else None
    at = "tensor at position 2 (parameter 'fc.weight')" if named else "tensor at position 2"
    for call, op in [(znorm_kernels.znorm_, "znorm_"), (znorm_kernels.gc_, "gc_")]:
        grads = [make_grad((4,), seed=1), make_grad((5,), seed=2), bad]
        with pytest.raises(exc) as err:
            call(grads, names=names)
        assert str(err.value) == f"{op}: {at} {MESSAGES[kind]}"
    with pytest.raises(exc) as err:  # the checks' own default op name
        validation.collect([make_grad((4,)), make_grad((5,)), bad], names)
    assert str(err.value) == f"znorm_: {at} {MESSAGES[kind]}"


def test_overlap_message_names_the_op_both_positions_and_parameters():
    a = make_grad((30,))
    with pytest.raises(ValueError) as err:
        znorm_kernels.gc_([make_grad((3,)), a, a[5:20]], names=["x", "w", "w_window"])
    assert str(err.value) == (
        "gc_: tensor at position 1 (parameter 'w') and tensor at position 2 (parameter 'w_window') share "
        "part of their memory; normalizing one would change the other (the same tensor twice is fine, a "
        "partial overlap is not)"
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"eps": -1.0}, ValueError, "eps must be a finite number >= 0, got -1.0"),
        ({"eps": float("inf")}, ValueError, "eps must be a finite number >= 0, got inf"),
        ({"correction": -1}, ValueError, "correction must be a finite number >= 0, got -1"),
        ({"correction": "1"}, ValueError, "correction must be a finite number >= 0, got '1'"),
        ({"backend": None}, TypeError, "backend must be a string, got NoneType"),
        ({"backend": 3}, TypeError, "backend must be a string, got int"),
        ({"backend": "fastest"}, ValueError, "unknown ZNorm backend 'fastest'; known backends: "),
    ],
)
def test_bad_option_messages(kwargs, exc, message):
    with pytest.raises(exc) as err:
        znorm_kernels.znorm_([make_grad((5,))], **kwargs)
    assert str(err.value).startswith(message) and (message.endswith(": ") or str(err.value) == message)


class _EqualsAuto:
    """Not a string, though it compares and hashes like "auto"."""

    def __eq__(self, other):
        return other == "auto"

    def __hash__(self):
        return hash("auto")


@pytest.mark.parametrize("entry", ["znorm_", "register", "ZNormSGD"])
def test_a_backend_that_only_equals_a_name_is_refused_after_that_name_was_accepted(entry):
    # Accepted options are remembered by type and value: an object equal to "auto" must not pass as it.
    from znorm_kernels.optim import ZNormSGD

    params = [torch.nn.Parameter(make_grad((5,)))]
    call = {
        "znorm_": lambda backend: znorm_kernels.znorm_([make_grad((5,))], backend=backend),
        "register": lambda backend: znorm_kernels.register(torch.optim.SGD(params, lr=0.1), backend=backend),
        "ZNormSGD": lambda backend: ZNormSGD(params, lr=0.1, backend=backend),
    }[entry]
    call("auto")
    with pytest.raises(TypeError) as err:
        call(_EqualsAuto())
    assert str(err.value) == "backend must be a string, got _EqualsAuto"


@pytest.mark.parametrize(("entries", "kind"), [(5, "int"), (None, "NoneType"), (2.5, "float")])
def test_entries_that_are_not_a_list_are_named(entries, kind):
    with pytest.raises(TypeError) as err:
        znorm_kernels.znorm_(entries)
    assert str(err.value) == f"znorm_: expected an iterable of tensors, got {kind}"
    # The checks name the op that called them (znorm_ may answer first on its DTensor path).
    with pytest.raises(TypeError) as err:
        validation.collect_indices(entries, op="gc_")
    assert str(err.value) == f"gc_: expected an iterable of tensors, got {kind}"


def test_accepted_options_are_remembered_by_type_and_value(monkeypatch):
    from znorm_kernels import options

    monkeypatch.setattr(options, "_accepted", set())
    checked = []
    real = options._check_number
    monkeypatch.setattr(options, "_check_number", lambda name, x: checked.append(name) or real(name, x))
    options.check_options(1, 0, "auto")
    options.check_options(1, 0, "auto")
    assert checked == ["eps", "correction"], "an accepted set of options is not checked again"
    with pytest.raises(
        ValueError, match="eps must be"
    ):  # True == 1 and hashes alike: the type tells them apart
        options.check_options(True, 0, "auto")
    with pytest.raises(ValueError, match="correction must be"):
        options.check_options(1, False, "auto")
    for i in range(100):
        options.check_options(1e-10 * (i + 1), 0, "auto")
    assert len(options._accepted) == 64, "at most 64 sets of options are remembered"


def test_not_iterable():
    with pytest.raises(TypeError, match="iterable"):
        znorm_kernels.znorm_(3.0)


def test_collect_groups_by_device_and_dtype_in_order():
    a, b, c, d = (
        make_grad((5,)),
        make_grad((5,), torch.float16),
        make_grad((6,)),
        make_grad((2, 2), torch.float64),
    )
    groups = validation.collect([a, None, b, torch.randn(1), torch.randn(0), c, d, torch.randn(())])
    assert list(groups) == [(a.device, torch.float32), (b.device, torch.float16), (d.device, torch.float64)]
    assert groups[(a.device, torch.float32)] == [a, c]


def test_available_backends():
    names = znorm_kernels.available_backends()
    assert names[-1] == "reference"
    assert set(names) <= set(known_backends())
    # Listed fastest first, in the table's order.
    assert names == [n for n in registry.BACKENDS if n in names]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU, Triton serves whatever TRITON_INTERPRET says"
)
def test_triton_availability_follows_triton_interpret_when_it_changes(monkeypatch):
    pytest.importorskip("triton")
    from znorm_kernels.backends import triton_host

    if triton_host.interpreter_broken():
        pytest.skip(triton_host.interpreter_broken())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in znorm_kernels.available_backends()
    with pytest.raises(RuntimeError, match="triton"):
        znorm_kernels.znorm_([torch.randn(5)], backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in znorm_kernels.available_backends()
    assert registry.resolve_backend("triton", "cpu") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in znorm_kernels.available_backends()


def test_auto_resolution_follows_spec():
    have = znorm_kernels.available_backends()
    cpu = registry.resolve_backend("auto", "cpu")
    assert cpu == ("cpu" if "cpu" in have else "reference")
    assert registry.resolve_backend("auto", "meta") == "reference"
    if torch.cuda.is_available():
        cuda = registry.resolve_backend("auto", "cuda")
        expected = next(n for n in ("triton", "cuda", "reference") if n in have)
        assert cuda == expected


@pytest.mark.parametrize("name", [n for n in known_backends() if n != "reference"])
def test_explicit_backend_that_cannot_serve_raises_and_modifies_nothing(name):
    for device in ["cpu", "cuda", "meta"]:
        try:
            registry.resolve_backend(name, device)
        except RuntimeError as err:
            assert name in str(err)
            if device == "meta":
                grads = [torch.empty(5, device="meta")]
                with pytest.raises(RuntimeError, match=name):
                    znorm_kernels.znorm_(grads, backend=name)
            if device == "cpu":
                grads = _good_list()
                before = [g.clone() for g in grads]
                with pytest.raises(RuntimeError, match=name):
                    znorm_kernels.znorm_(grads, backend=name)
                assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_mixed_devices_one_unservable_modifies_nothing():
    # A group the backend cannot serve is found before any group runs.
    grads = [make_grad((5,)), torch.empty(5, device="meta")]
    before = grads[0].clone()
    for name in known_backends():
        if name == "reference":
            continue
        with pytest.raises(RuntimeError):
            znorm_kernels.znorm_(grads, backend=name)
        assert torch.equal(grads[0], before)


def test_empty_inputs():
    znorm_kernels.znorm_([])
    znorm_kernels.znorm_([None, None])


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [
        ("3.6.0", "2.4.6", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.1", "2.4.6", False),
        ("3.10.0", "3.0.0", False),
        ("3.6.0", "unknown", False),  # a version that is not major.minor... is taken for an old one
    ],
)
def test_triton_interpreter_known_broken_with_numpy_2_4_before_triton_3_7(
    monkeypatch, triton_version, numpy_version, broken
):
    triton = pytest.importorskip("triton")
    import numpy

    from znorm_kernels.backends import triton_host

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    triton_host.interpreter_broken.cache_clear()
    registry.clear_caches()
    try:
        why = registry.unavailable("triton")
        assert (why is not None) == broken
        if broken:
            assert "numpy<2.4 or triton>=3.7" in why
            assert "triton" not in znorm_kernels.available_backends()
            with pytest.raises(RuntimeError, match=r"numpy<2\.4"):
                znorm_kernels.znorm_([torch.randn(5)], backend="triton")
    finally:
        triton_host.interpreter_broken.cache_clear()
        registry.clear_caches()


@pytest.mark.parametrize("min_ndim", [0, 1, 4])
def test_min_ndim_accepts_every_int_from_zero(min_ndim):
    # 0 selects every parameter (0-d ones are left unchanged all the same: fewer than 2 elements).
    w, s = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(()))
    opt = torch.optim.SGD([w, s], lr=0.1)
    handle = znorm_kernels.register(opt, min_ndim=min_ndim, backend="reference", track_stats=True)
    w.grad, s.grad = make_grad((3, 2)), torch.tensor(0.5)
    opt.step()
    stats = handle.grad_stats()
    assert ([] if stats is None else stats.names) == {0: ["#0", "#1"], 1: ["#0"], 4: []}[min_ndim]


@pytest.mark.parametrize("min_ndim", [-1, 1.0, True, "1", None])
def test_min_ndim_rejects_anything_else(min_ndim):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError) as err:
        znorm_kernels.register(opt, min_ndim=min_ndim)
    assert str(err.value) == f"min_ndim must be an int >= 0, got {min_ndim!r}"
