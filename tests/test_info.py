"""``python -m znorm_kernels`` (znorm_kernels/info.py): the diagnosis's sections, JSON and exit status."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from znorm_kernels import cuda_archs, info, registry

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Versions", "Devices", "Backends", "Extension znorm_kernels._C", "Environment", "Self-check")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "znorm_kernels", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fresh_dispatch():
    registry.clear_caches()
    yield
    registry.clear_caches()


def test_text_in_process(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert f"\n{section}" in out
    assert f"torch          {torch.__version__}" in out
    for name in registry.BACKENDS:
        assert f"  {name:<10} " in out
    assert "Result: OK" in out


def test_json_schema_in_process(capsys):
    assert info.main(["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["schema_version"] == info.SCHEMA_VERSION
    assert r["ok"] is True
    assert set(r) >= {"versions", "devices", "backends", "auto", "extension", "environment", "self_check"}
    versions = {"znorm_kernels", "python", "torch", "torch_cuda", "triton", "numpy", "platform"}
    assert set(r["versions"]) >= versions
    assert r["devices"]["cuda_available"] == torch.cuda.is_available()
    assert len(r["devices"]["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for d in r["devices"]["cuda"]:
        assert set(d) >= {"index", "name", "capability", "total_memory_bytes"}
    assert [b["name"] for b in r["backends"]] == list(registry.BACKENDS)
    for b in r["backends"]:
        assert b["available"] == (b["reason"] is None) == (registry.unavailable(b["name"]) is None)
    assert r["auto"]["cpu"] in registry.BACKENDS
    ext = r["extension"]
    assert set(ext) >= {"built", "reason", "path", "cuda_kernel", "cuda_archs", "cuda_archs_source"}
    assert ext["built"] == (ext["reason"] is None)
    if ext["built"]:
        assert Path(ext["path"]).is_file()
    assert "TRITON_INTERPRET" in r["environment"]
    check = r["self_check"]
    assert check["dtypes"] == ["float32", "bfloat16"] and check["ok"] is True
    checked = {(row["backend"], row["device"]) for row in check["results"] if row["status"] != "skipped"}
    for b in r["backends"]:
        if b["available"] and registry.BACKENDS[b["name"]].serves(torch.device("cpu")) is None:
            assert (b["name"], "cpu") in checked
    for row in check["results"]:
        if row["status"] != "skipped":
            assert row["status"] == "pass" and row["error"] is None
            assert 0 <= row["max_error"] < 0.05 and row["max_excess"] <= 0


def test_subprocess_text_and_json():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ZNORM_TEST_SWITCH"] = "on"
    done = _run(env=env)
    assert done.returncode == 0, done.stderr
    for section in SECTIONS:
        assert f"\n{section}" in done.stdout
    assert "ZNORM_TEST_SWITCH" in done.stdout
    if importlib.util.find_spec("triton") is not None:  # the interpreter is not run unless asked for
        assert "triton     cpu     skipped: the Triton interpreter" in done.stdout
    done = _run("--json", env=env)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["ok"] is True and r["environment"]["ZNORM_TEST_SWITCH"] == "on"
    assert r["self_check"]["triton_interpreter"] is False


def _bad_backend(name: str, raises: bool) -> registry.Backend:
    def group(tensors, eps, correction, grad_scale):
        if raises:
            raise RuntimeError("kernel exploded")
        for t in tensors:
            t.fill_(3.0)  # not z-scores

    return registry.Backend(name=name, unavailable=lambda: None, serves=lambda d: None, load=lambda: group)


@pytest.mark.parametrize("raises", [False, True])
def test_failing_backend_exits_1(monkeypatch, capsys, fresh_dispatch, raises):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(registry.BACKENDS, "cpu", _bad_backend("cpu", raises))
    assert info.main([]) == 1
    out = capsys.readouterr().out
    assert "Result: FAILED" in out
    assert ("kernel exploded" in out) == raises
    assert info.main(["--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] is False
    bad = [row for row in r["self_check"]["results"] if row["status"] == "fail"]
    assert bad and {row["backend"] for row in bad} == {"cpu"}
    assert info.main(["--no-check"]) == 0


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    body = b""
    for kind, arch in entries:
        payload = b"\0" * 24
        header = struct.pack("<HHIQIIII", kind, 0x101, 64, len(payload), 0, 0, 0x10008, arch).ljust(64, b"\0")
        body += header + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_cuda_archs_from_the_so(tmp_path, monkeypatch):
    data = b"\x7fELF junk" + _fatbin([(2, 80), (2, 90)]) + b"more" + _fatbin([(2, 90), (1, 90)])
    assert cuda_archs.parse_fatbin(data) == ["sm_80", "sm_90", "compute_90"]
    assert cuda_archs.parse_fatbin(b"no fatbinary here") == []
    so = tmp_path / "_C.so"
    so.write_bytes(data)
    monkeypatch.setattr(cuda_archs, "_archs_from_cuobjdump", lambda path: None)
    assert cuda_archs.cuda_archs(so) == (["sm_80", "sm_90", "compute_90"], "fatbinary headers in the .so")
    so.write_bytes(b"plain")
    assert cuda_archs.cuda_archs(so) == (None, "unknown")
    monkeypatch.setattr(cuda_archs, "_archs_from_cuobjdump", lambda path: ["sm_90"])
    assert cuda_archs.cuda_archs(so) == (["sm_90"], "cuobjdump")


def test_parse_cuobjdump():
    text = "ELF file    1: _C.abi3.1.sm_80.cubin\nELF file    2: _C.abi3.2.sm_90a.cubin\n"
    assert cuda_archs.parse_cuobjdump(text) == ["sm_80", "sm_90a"]
    assert cuda_archs.parse_cuobjdump("PTX file    1: _C.abi3.1.sm_90.ptx\n", "compute") == ["compute_90"]


def test_arch_warnings():
    ext = {"cuda_kernel": True, "cuda_archs": ["sm_90"]}
    dev = {"cuda": [{"index": 0, "capability": "8.0"}, {"index": 1, "capability": "9.0"}]}
    assert info._arch_warnings(ext, dev) == ["cuda:0 is sm_80; the extension holds code for sm_90 only"]
    assert info._arch_warnings({"cuda_kernel": True, "cuda_archs": ["sm_80", "compute_80"]}, dev) == []
    assert info._arch_warnings({"cuda_kernel": True, "cuda_archs": None}, dev) == []
