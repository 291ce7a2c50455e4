"""The CUDA architectures a built extension holds code for, read from the shared object itself (setup.py
passes ZNORM_CUDA_ARCHS to nvcc but records no list in the build): ``cuobjdump --list-elf/--list-ptx`` when
it is installed, else the headers of the fatbinary embedded in the .so. For ``python -m znorm_kernels``."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

__all__ = ["cuda_archs", "parse_cuobjdump", "parse_fatbin"]


def _archs_from_cuobjdump(so: Path) -> list[str] | None:
    exe = shutil.which("cuobjdump")
    if exe is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(home) / "bin" / "cuobjdump"
        exe = str(candidate) if candidate.is_file() else None
    if exe is None:
        return None
    archs: list[str] = []
    for flag, kind in (("--list-elf", "sm"), ("--list-ptx", "compute")):
        try:
            done = subprocess.run([exe, flag, str(so)], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        archs += parse_cuobjdump(done.stdout, kind)
    return archs


def parse_cuobjdump(text: str, kind: str = "sm") -> list[str]:
    """The architectures in ``cuobjdump --list-elf`` (kind "sm") or ``--list-ptx`` (kind "compute") output,
    whose lines read e.g. ``ELF file    1: _C.1.sm_90.cubin`` or ``PTX file    1: _C.1.sm_90.ptx``."""
    found = []
    for m in re.finditer(r"\bsm_(\d+[a-z]?)\.(?:cubin|ptx)\b", text):
        arch = f"{kind}_{m.group(1)}"
        if arch not in found:
            found.append(arch)
    return found


_FATBIN_MAGIC = 0xBA55ED50


def parse_fatbin(data: bytes) -> list[str]:
    """The architectures of the entries of every fatbinary embedded in ``data`` (an ELF shared object):
    "sm_XY" for a cubin, "compute_XY" for PTX. Each fatbinary is a 16-byte header (magic 0xBA55ED50,
    version 1, header size, payload size) followed by entries, each with a header of (kind: 1 PTX, 2 cubin;
    version; header size; payload size; ...; arch at byte 28). Headers are never compressed, payloads may
    be."""
    found: list[str] = []
    magic = struct.pack("<I", _FATBIN_MAGIC)
    at = data.find(magic)
    while at >= 0 and at + 16 <= len(data):
        _, version, header, size = struct.unpack_from("<IHHQ", data, at)
        end = at + header + size
        if version == 1 and header == 16 and end <= len(data):
            p = at + header
            while p + 32 <= end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
                (arch,) = struct.unpack_from("<I", data, p + 28)
                if entry_header < 32 or kind not in (1, 2):
                    break
                name = f"{'sm' if kind == 2 else 'compute'}_{arch}"
                if name not in found:
                    found.append(name)
                p += entry_header + payload
        at = data.find(magic, at + 4)
    return found


def cuda_archs(so: Path) -> tuple[list[str] | None, str]:
    """(the CUDA architectures ``so`` holds code for, how that was found); (None, "unknown") when nothing
    says. setup.py passes ZNORM_CUDA_ARCHS to nvcc but records no list in the build, so the .so is read."""
    archs = _archs_from_cuobjdump(so)
    if archs:
        return archs, "cuobjdump"
    try:
        archs = parse_fatbin(so.read_bytes())
    except OSError:
        archs = []
    if archs:
        return archs, "fatbinary headers in the .so"
    return None, "unknown"
