"""Triton kernels of the fused ZNorm optimizer step: SGD and Adam/AdamW updates that apply ZNorm as they load
the gradient (host side: triton_optim.py).

One launch per (device, dtype) group. The caller has already run the statistics stage
(``triton_host.statistics``), which leaves a float64 [T, 4] tensor of (mean, std, inv, wide) per tensor; this
launch reads every gradient, parameter and state element once and writes every parameter and state element
once (and the gradient too with WRITE_GRAD). There is no queue and no waiting: every program owns one item,
a chunk of at most CHUNK elements of one tensor, and walks it BLOCK elements at a time. Items share nothing,
so the result is bitwise deterministic; nothing but the parameters, the states (and, with WRITE_GRAD, the
gradient) is written, so there is no workspace to reset.

The z-score is the value the normalize pass would have written into the gradient, bit for bit:
``normalized`` (the float32 pair subtraction) or, for a "wide" tensor, (g - mean) * inv in float64, rounded
to the tensor's dtype by ``to_output``. Tensors of fewer than 2 elements, which ZNorm leaves unchanged, take
z = g whatever their statistics row holds. With a grad scale s (GradScaler and an optimizer that unscales
itself), the statistics are those of the scaled gradient s*g computed with grad_scale=s, so that value is s*z
(what the hook writes for a fused optimizer), and the kernel divides it by s as torch's fused optimizers do.
With found_inf nonzero (read on the device), a program writes nothing.

The update runs in float32 (float64 for float64 tensors), one operation at a time in torch.optim's order, with
correctly rounded division and square root and no FMA contraction (compile option), each stored value rounded
once to the tensor's dtype. Python-float hyperparameters arrive as the int64 bit patterns of float64 values
(Triton would pass a float as float32), so float64 tensors get them whole and the others get them rounded to
float32, as torch's kernels do with their double scalars.
"""

# Triton's JIT compiles a subset of Python: keep plain if/else blocks and `ACC == tl.x` comparisons (as
# pyproject.toml allows for triton_kernels.py).

from __future__ import annotations

import triton
import triton.language as tl

from .triton_tile_ops import load_tile, normalized, store_tile, to_output, wide_z

# Layout of the int64 table: I items of ITEM fields, [tensor record, first element, element count, 0]; then T
# tensor records of TENSOR fields:
#     [param, grad, state 1, state 2, state 3 addresses, numel, first (SGD: momentum buffer is new), row]
# states: SGD (momentum buffer, 0, 0); Adam (exp_avg, exp_avg_sq, max_exp_avg_sq or 0). row: the tensor's
# index in the caller's list (its row of stats and of the per-tensor scalars).
ITEM = tl.constexpr(4)
TENSOR = tl.constexpr(8)


@triton.jit
def _f64(bits):
    """The float64 whose bit pattern is the integer argument ``bits``."""
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """Correctly rounded a / b (Triton's float32 '/' is approximate on the GPU)."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, ACC: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is approximate in float32 on the GPU, sqrt.rn in float64)."""
    if ACC == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _record(meta_ptr, num_items):
    """The program's item: pointer to its tensor record, its first element and its element count."""
    item = meta_ptr + ITEM * tl.program_id(0).to(tl.int64)
    t = tl.load(item)
    start = tl.load(item + 1)
    count = tl.load(item + 2).to(tl.int32)
    rec = meta_ptr + ITEM * num_items.to(tl.int64) + TENSOR * t
    return rec, start, count


@triton.jit
def _base(rec, field, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(rec + field).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _z_stats(rec, stats_ptr, row):
    """(mean, inv, wide) of the tensor; (0, 1, 0), which gives z = g exactly, below 2 elements."""
    numel = tl.load(rec + 5)
    tiny = numel < 2
    mean = tl.where(tiny, 0.0, tl.load(stats_ptr + 4 * row))
    inv = tl.where(tiny, 1.0, tl.load(stats_ptr + 4 * row + 2))
    wide = tl.where(tiny, 0.0, tl.load(stats_ptr + 4 * row + 3))
    return mean, inv, wide


@triton.jit
def _z(
    g_ptr,
    rem,
    mean,
    inv,
    wide,
    scale,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """A tile's z-scores in ACC: the normalize pass's value in the tensor's dtype, divided by the scale."""
    x, _ = load_tile(g_ptr, rem, ACC, BLOCK, VEC, ALIGNED)
    if wide != 0.0:
        z = to_output(wide_z(x, mean, inv, wide, ACC).to(ACC), DTYPE).to(ACC)
    else:
        z = normalized(x, mean, inv, DTYPE, ACC).to(ACC)
    if HAS_SCALE:
        z = _div(z, scale, ACC)
    return z


@triton.jit
def _item(meta_ptr, num_items, stats_ptr, scale_ptr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr):
    """What both updates read first for this program's item: its record, first element and length, its
    tensor's statistics row and (mean, inv, wide), and the gradient scale (1 without one)."""
    rec, start, count = _record(meta_ptr, num_items)
    row = tl.load(rec + 7)
    mean, inv, wide = _z_stats(rec, stats_ptr, row)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(ACC)
    else:
        scale = tl.cast(1.0, ACC)
    return rec, start, count, row, mean, inv, wide, scale


@triton.jit
def _direction(
    g_ptr, p_ptr, rem, mean, inv, wide, scale,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """What both updates start from, for one tile: d = z (-z with MAXIMIZE), z stored into the gradient
    with WRITE_GRAD, and the parameter tile."""
    z = _z(g_ptr, rem, mean, inv, wide, scale, DTYPE, ACC, BLOCK, VEC, ALIGNED, HAS_SCALE)
    if WRITE_GRAD:
        store_tile(g_ptr, to_output(z, DTYPE), rem, BLOCK, VEC, ALIGNED)
    p, _ = load_tile(p_ptr, rem, ACC, BLOCK, VEC, ALIGNED)
    if MAXIMIZE:
        d = -z
    else:
        d = z
    return d, p


@triton.jit
def _skip(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    if HAS_FOUND_INF:
        return tl.load(found_inf_ptr).to(tl.float32) != 0.0
    else:
        return False


@triton.jit(do_not_specialize=["num_items"])
def znorm_sgd_kernel(
    meta_ptr,  # int64 table, layout above
    stats_ptr,  # float64 [T, 4]: (mean, std, inv, wide) per tensor (triton_host.statistics)
    scale_ptr,  # 0-d grad scale (read only when HAS_SCALE)
    found_inf_ptr,  # 0-d found_inf (read only when HAS_FOUND_INF)
    num_items,
    lr_bits: tl.int64,  # float64 bit patterns
    momentum_bits: tl.int64,
    one_minus_dampening_bits: tl.int64,
    weight_decay_bits: tl.int64,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    FIRST: tl.constexpr,  # 0: no momentum buffer is new, 1: all are, 2: the tensor record says
    WRITE_GRAD: tl.constexpr,
):
    if not _skip(found_inf_ptr, HAS_FOUND_INF):
        rec, start, count, _row, mean, inv, wide, scale = _item(
            meta_ptr, num_items, stats_ptr, scale_ptr, ACC, HAS_SCALE
        )
        lr = _f64(lr_bits).to(ACC)
        momentum = _f64(momentum_bits).to(ACC)
        one_minus_dampening = _f64(one_minus_dampening_bits).to(ACC)
        weight_decay = _f64(weight_decay_bits).to(ACC)
        if FIRST == 2:
            first = tl.load(rec + 6) != 0
        else:
            first = FIRST == 1
        p_ptr = _base(rec, 0, start, DTYPE, ALIGNED)
        g_ptr = _base(rec, 1, start, DTYPE, ALIGNED)
        b_ptr = _base(rec, 2, start, DTYPE, ALIGNED)
        for tile in range(0, count, BLOCK):
            rem = count - tile
            d, p = _direction(
                g_ptr + tile, p_ptr + tile, rem, mean, inv, wide, scale,
                DTYPE, ACC, BLOCK, VEC, ALIGNED, HAS_SCALE, WRITE_GRAD, MAXIMIZE,
            )  # fmt: skip
            if WEIGHT_DECAY:
                d = d + weight_decay * p
            if MOMENTUM:
                if first:
                    buf = d
                else:
                    buf, _ = load_tile(b_ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
                    buf = buf * momentum + one_minus_dampening * d
                buf = to_output(buf, DTYPE)
                store_tile(b_ptr + tile, buf, rem, BLOCK, VEC, ALIGNED)
                if NESTEROV:
                    d = d + momentum * buf.to(ACC)
                else:
                    d = buf.to(ACC)
            p = p - lr * d
            store_tile(p_ptr + tile, to_output(p, DTYPE), rem, BLOCK, VEC, ALIGNED)


@triton.jit(do_not_specialize=["num_items"])
def znorm_adam_kernel(
    meta_ptr,  # int64 table, layout above
    stats_ptr,  # float64 [T, 4]: (mean, std, inv, wide) per tensor (triton_host.statistics)
    scale_ptr,  # 0-d grad scale (read only when HAS_SCALE)
    found_inf_ptr,  # 0-d found_inf (read only when HAS_FOUND_INF)
    steps_ptr,  # float64 [T, 2]: (step_size, bias_correction2_sqrt) per tensor (read only when PER_TENSOR)
    num_items,
    lerp_weight_bits: tl.int64,  # float64 bit patterns: 1 - beta1
    beta2_bits: tl.int64,
    one_minus_beta2_bits: tl.int64,
    weight_decay_bits: tl.int64,
    decay_factor_bits: tl.int64,  # 1 - lr * weight_decay (decoupled)
    eps_bits: tl.int64,
    step_size_bits: tl.int64,  # when not PER_TENSOR
    bc2_sqrt_bits: tl.int64,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    PER_TENSOR: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    if not _skip(found_inf_ptr, HAS_FOUND_INF):
        rec, start, count, row, mean, inv, wide, scale = _item(
            meta_ptr, num_items, stats_ptr, scale_ptr, ACC, HAS_SCALE
        )
        weight = _f64(lerp_weight_bits)
        small_weight = tl.abs(weight) < 0.5  # torch.lerp's two formulas
        weight = weight.to(ACC)
        one_minus_weight = tl.cast(1.0, ACC) - weight
        beta2 = _f64(beta2_bits).to(ACC)
        one_minus_beta2 = _f64(one_minus_beta2_bits).to(ACC)
        weight_decay = _f64(weight_decay_bits).to(ACC)
        decay_factor = _f64(decay_factor_bits).to(ACC)
        eps = _f64(eps_bits).to(ACC)
        if PER_TENSOR:
            step_size = tl.load(steps_ptr + 2 * row).to(ACC)
            bc2_sqrt = tl.load(steps_ptr + 2 * row + 1).to(ACC)
        else:
            step_size = _f64(step_size_bits).to(ACC)
            bc2_sqrt = _f64(bc2_sqrt_bits).to(ACC)
        p_ptr = _base(rec, 0, start, DTYPE, ALIGNED)
        g_ptr = _base(rec, 1, start, DTYPE, ALIGNED)
        m_ptr = _base(rec, 2, start, DTYPE, ALIGNED)
        v_ptr = _base(rec, 3, start, DTYPE, ALIGNED)
        vmax_ptr = _base(rec, 4, start, DTYPE, ALIGNED)
        for tile in range(0, count, BLOCK):
            rem = count - tile
            d, p = _direction(
                g_ptr + tile, p_ptr + tile, rem, mean, inv, wide, scale,
                DTYPE, ACC, BLOCK, VEC, ALIGNED, HAS_SCALE, WRITE_GRAD, MAXIMIZE,
            )  # fmt: skip
            if WEIGHT_DECAY:
                if DECOUPLED:
                    p = p * decay_factor
                else:
                    d = d + weight_decay * p
            m, _ = load_tile(m_ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
            if small_weight:
                m = m + weight * (d - m)
            else:
                m = d - (d - m) * one_minus_weight
            m = to_output(m, DTYPE)
            store_tile(m_ptr + tile, m, rem, BLOCK, VEC, ALIGNED)
            v, _ = load_tile(v_ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
            v = to_output(v * beta2 + one_minus_beta2 * d * d, DTYPE)
            store_tile(v_ptr + tile, v, rem, BLOCK, VEC, ALIGNED)
            v = v.to(ACC)
            if AMSGRAD:
                vmax, _ = load_tile(vmax_ptr + tile, rem, ACC, BLOCK, VEC, ALIGNED)
                v = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
                store_tile(vmax_ptr + tile, v.to(DTYPE), rem, BLOCK, VEC, ALIGNED)
            denom = _div(_sqrt(v, ACC), bc2_sqrt, ACC) + eps
            p = p - _div(step_size * m.to(ACC), denom, ACC)
            store_tile(p_ptr + tile, to_output(p, DTYPE), rem, BLOCK, VEC, ALIGNED)
