"""The real parameter lists the benchmarks run on, as lists of shapes (no model weights are needed).

Names accepted by ``get_list`` (and ``python -m bench --lists``):

- ``resnet56``, ``resnet110``, ``resnet152``: CIFAR ResNets of depth 6n+2 (znorm_kernels.cifar.models);
  167 / 329 / 455 tensors, 0.85 / 1.73 / 2.41 M elements.
- ``resnet50``: torchvision's ImageNet ResNet-50 (161 tensors, 25.6 M elements), built without weights.
- ``vitb16``: torchvision's ViT-B/16 (152 tensors, 86.6 M elements, the largest 2.4 M), built without weights.
- ``llm``: the LLM-shaped list of PERF.md, d=2048, 12 layers, vocab 50304 (147 tensors, 707.3 M elements);
  ``llm-d512`` (and ``llm-d<D>`` or ``llm-d<D>-l<L>`` in general) is the same layout scaled down, as the CPU
  runs use: d=512 gives 147 tensors, 63.6 M elements.
- ``plain100m``: one tensor of 100 M elements (the CPU backend's GB/s against a plain copy).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from znorm_kernels.cifar.models import cifar_resnet

__all__ = [
    "LIST_NAMES",
    "ParamList",
    "get_list",
    "llm_shapes",
    "plain_shapes",
    "resnet50_shapes",
    "resnet_cifar_shapes",
    "vit_b16_shapes",
]

Shape = tuple[int, ...]

# The names that ``--full`` runs, in order (the LLM list is scaled down on the CPU, see bench/__main__.py).
LIST_NAMES = ("resnet56", "resnet110", "resnet152", "resnet50", "vitb16", "llm", "plain100m")


@dataclass(frozen=True)
class ParamList:
    """A named list of gradient shapes."""

    name: str
    label: str
    shapes: tuple[Shape, ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


@functools.cache
def resnet_cifar_shapes(depth: int) -> list[Shape]:
    """Gradient shapes of a CIFAR ResNet of depth 6n+2 (ResNet-56: 167 tensors, 0.85 M elements)."""
    return [tuple(p.shape) for p in cifar_resnet(depth).parameters()]


@functools.cache
def resnet50_shapes() -> list[Shape]:
    """Gradient shapes of torchvision's ResNet-50 (161 tensors, 25.6 M elements); no weights downloaded."""
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50(weights=None).parameters()]


@functools.cache
def vit_b16_shapes() -> list[Shape]:
    """Gradient shapes of torchvision's ViT-B/16 (152 tensors, 86.6 M elements); no weights downloaded."""
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.vit_b_16(weights=None).parameters()]


def llm_shapes(d: int = 2048, layers: int = 12, vocab: int = 50304) -> list[Shape]:
    """A GPT-2-style decoder's gradient shapes: tied token embedding (vocab x d, no learned positions),
    per layer LayerNorm, fused QKV projection, output projection, LayerNorm and a 4d MLP, all with biases
    (12 tensors, 12 d^2 + 13 d elements), and a final LayerNorm. d=2048, 12 layers, vocab 50304 gives
    PERF.md's list: 147 tensors, 707,325,952 elements (the embedding alone 103 M)."""
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(3 * d, d), (3 * d,)]  # attention qkv
        shapes += [(d, d), (d,)]  # attention output projection
        shapes += [(d,), (d,)]  # ln_2 weight, bias
        shapes += [(4 * d, d), (4 * d,)]  # mlp up
        shapes += [(d, 4 * d), (d,)]  # mlp down
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def plain_shapes(n: int = 100_000_000) -> list[Shape]:
    """One flat tensor of n elements."""
    return [(n,)]


def get_list(name: str) -> ParamList:
    """The parameter list called ``name`` (see the module docstring); ValueError for an unknown name."""
    cifar = re.fullmatch(r"resnet(\d+)", name)
    if cifar and name != "resnet50":
        depth = int(cifar.group(1))
        label = f"ResNet-{depth} (CIFAR)" + (", n=25" if depth == 152 else "")
        return ParamList(name, label, tuple(resnet_cifar_shapes(depth)))
    if name == "resnet50":
        return ParamList(name, "ResNet-50 (torchvision)", tuple(resnet50_shapes()))
    if name == "vitb16":
        return ParamList(name, "ViT-B/16 (torchvision)", tuple(vit_b16_shapes()))
    llm = re.fullmatch(r"llm(?:-d(\d+))?(?:-l(\d+))?", name)
    if llm:
        d = int(llm.group(1) or 2048)
        layers = int(llm.group(2) or 12)
        label = f"LLM-shaped, d={d}, {layers} layers, vocab 50304"
        return ParamList(name, label, tuple(llm_shapes(d, layers)))
    plain = re.fullmatch(r"plain(\d+)m", name)
    if plain:
        n = int(plain.group(1)) * 1_000_000
        return ParamList(name, f"one tensor of {n // 1_000_000} M elements", tuple(plain_shapes(n)))
    raise ValueError(
        f"unknown parameter list {name!r}; known: resnet<depth> (CIFAR, 6n+2), resnet50, vitb16, llm, "
        "llm-d<D>[-l<L>], plain<N>m"
    )
