"""Training's per-head q/k RMSNorm + rotary embedding: one launch forward, one backward (autograd).

The forward is the inference kernel (``llmray.kernels.qk_norm_rope``: norm, round to the input dtype, rotate);
the backward recomputes each row's 1/rms from the saved input and, per token and head, rotates the incoming
gradient back (rope by -angle) and applies RMSNorm's backward:
    g  = rope^-1(dy)                     (the gradient at the normed, rounded value)
    dx = (w g - x_hat mean(x_hat w g)) / rms,   dw = sum over rows of g x_hat
Unfused, the training step runs rms_norm on q, on k, and rope, each forward and backward (six passes over
q/k); fused it is two: the rope pass is gone. The backward's kernels (``_qk_norm_rope_bwd``), by ``BWD``
(H200, qwen3-0.6b's 8 x 2,048 tokens x (16 + 8) heads of 128, one layer's backward incl. v's gradient copied
into the fused gradient and both weights' gradients, ~369 MB moved; session 9, bench/train_micro.py, old and
new in one run, both incoming-gradient layouts):
- ``"tma"`` (the default): a few persistent programs per SM walk (batch, token block, TMA_HG heads) items; x
  and the incoming gradient come as tensor-descriptor tiles, STAGES - 1 items ahead in shared memory (Triton's
  loop pipelining), so the bytes in flight are not bounded by registers; cos/sin gathered once an item:
  0.1066 ms (3.46 TB/s; in the graphed step 0.1015 ms a layer against 0.1398), the same bits as "rows".
  Needs Hopper (or the interpreter) and 16-byte aligned strides, else "groups" runs.
- ``"groups"``: HG heads of BT tokens a program (cos/sin loaded once for HG heads, the next head's tiles
  loaded during this one's math): 0.113 ms at 16 tokens x 8 heads.
- ``"rows"`` (the previous default): one head of ROWS_BT tokens a program: 0.1416 ms (2.61 TB/s). Its 254
  registers a thread leave 2 programs, ~32 KB of loads in flight, per SM.
- ``"token"``: programs walking token ranges (0.209 ms; A/B only).
A persistent tensor-descriptor forward (the same items) was no faster than the inference kernel (0.0571 ms
at best against 0.0564) and rounded some values differently: removed.
"""

from __future__ import annotations

import torch
import triton

from llmray.kernels._common import interpreting, num_sms
from llmray.kernels._qk_norm_rope_bwd import (
    _copy_rows_kernel,
    _head_group_kernel,
    _head_rows_kernel,
    _tma_kernel,
    _token_kernel,
)

try:  # host-side tensor descriptors (Triton >= 3.4): the "tma" design
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None
from llmray.kernels._rms_norm_bwd import DW_SUM, _sum_partials
from llmray.kernels.qk_norm_rope import qk_norm_rope

__all__ = ["qk_norm_rope_train", "qkv_norm_rope_train"]

# backward knobs (the GPU A/B sets them, bench/train_micro.py): the design ("tma" | "groups" | "rows" | "token"),
# weight-gradient slot rows; the row kernel's tokens a program and warps (W1: 32 tokens 0.142 ms, 16: 0.190, 64:
# 0.161; 8 warps 0.196)
BWD = "tma"
NSLOT = 64
ROWS_BT = 32
ROWS_WARPS: int | None = None
# "groups": tokens a program, heads a program, warps, the next head's loads before this head's math, eviction
# hints (x/g evict_first, cos/sin evict_last). Session 9 sweep (ms): 16 x 8 0.113, 16 x 4 0.114, 32 x 4 0.1225
# (8 warps 0.119, no prefetch 0.1435, eviction hints 0.1228), 32 x 2 0.1286, 16 x 2 on 2 warps 0.1186
GROUP_BT = 16
GROUP_HG = 8
GROUP_WARPS = 4
GROUP_PREFETCH = True
GROUP_EVICT = False
# "tma": programs per SM, tokens an item, warps, pipeline stages, heads an item, ptxas register cap. Session 9
# sweeps (ms; two runs, ~1% apart): 2 x 32 tokens x 2 heads, 4 warps, 3 stages 0.1066-0.107; x 1 head 0.1075
# (4 stages 0.1082); 3 x 32 x 1 at 168 registers 0.1079; 4 x 16 x 2 at 128 registers 0.1077, x 1 0.1095;
# 3 x 16 x 2 at 168 0.1084; 2 x 16 x 4 0.1154; 3 x 16 x 1, 6 stages 0.1761; 1 x 64 on 8 warps 0.1181
TMA_PER_SM = 2
TMA_BT = 32
TMA_WARPS = 4
TMA_STAGES = 3
TMA_HG = 2  # heads an item (cos/sin gathered once for them)
TMA_MAXNREG: int | None = None  # registers a thread (ptxas' .maxnreg: more programs fit an SM, some spill)
COPY_V = True  # the backward copies v's gradient into the fused gradient (else _copy_rows' kernel: +8 us)
COPY_ROWS = True  # v's gradient copied by _copy_rows_kernel (vs torch's strided copy_: 62 us a layer, H200)
PROGRAMS_PER_SM: int | None = None
NUM_WARPS: int | None = None


def _copy_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst.copy_(src) for (B, T, H, D) views whose tokens are rows (unit strides inside a token's H x D)."""
    b, t, h, d = dst.shape
    n = h * d
    rows_ok = all(
        x.stride(3) == 1 and x.stride(2) == d and x.stride(0) == t * x.stride(1) for x in (src, dst)
    )
    if not COPY_ROWS or not rows_ok or n & (n - 1) or (dst.device.type != "cuda" and not interpreting()):
        dst.copy_(src)
        return
    bm = max(1, 4096 // n)
    _copy_rows_kernel[(triton.cdiv(b * t, bm),)](
        src, dst, b * t, src.stride(1), dst.stride(1), N=n, BM=bm, num_warps=8
    )


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along the head dim (a copy only if it has none)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _split_dw(
    part: torch.Tensor, qdt: torch.dtype, kdt: torch.dtype, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqw, dkw) from (P, 2 D) fp32 partial rows [dqw | dkw]: one summing launch when the dtypes agree."""
    if qdt == kdt:
        dw = _sum_partials(part, qdt, DW_SUM)
        return dw[:d], dw[d:]
    return (_sum_partials(part[:, :d].contiguous(), qdt, DW_SUM),
            _sum_partials(part[:, d:].contiguous(), kdt, DW_SUM))  # fmt: skip


def _tma_ok(*xs: torch.Tensor) -> bool:
    """Tensor descriptors apply: Hopper or newer (or the interpreter), 16-byte aligned bases and strides, and
    no torch.compile tracing (fake tensors have no addresses)."""
    if TensorDescriptor is None or torch.compiler.is_compiling():
        return False
    dev = xs[0].device
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] < 9:
        return False
    return all(x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1])
               for x in xs)  # fmt: skip


def _desc(x: torch.Tensor, bt: int) -> object:
    """A (B, T, H, D) tensor descriptor with (1, bt, 1, D/2) blocks."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, bt, 1, x.shape[-1] // 2])


def _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk, dv=None, dv_out=None):
    """dq, dk (given outputs, any (b, t, h) strides) and the weights' gradients of rope(norm(q/k)); with
    ``dv``/``dv_out`` the kernel copies v's gradient into its slice of the fused gradient (returns whether it
    did)."""
    dqo, dko = _unit_d(dqo), _unit_d(dko)
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    ntok = bsz * t
    nq, nk = ctx.needs_input_grad[ctx.w_index], ctx.needs_input_grad[ctx.w_index + 1]
    cos, sin = cos.contiguous(), sin.contiguous()
    pos = positions.expand(bsz, t)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    strides = (*q.stride()[:3], *k.stride()[:3], *dqo.stride()[:3], *dko.stride()[:3], *dq.stride()[:3],
               *dk.stride()[:3])  # fmt: skip
    copy_v = dv is not None and dv_out is not None and COPY_V
    if copy_v:
        dv = _unit_d(dv)
    bwd = BWD
    if bwd == "tma" and not _tma_ok(q, k, dqo, dko, *((dv,) if copy_v else ())):
        bwd = "groups"
    if bwd == "tma":
        dw = nq or nk
        hg = max(1, min(TMA_HG, max(hq, hk)))  # heads an item (q and k alike)
        items = bsz * triton.cdiv(t, TMA_BT) * (triton.cdiv(hq, hg) + triton.cdiv(hk, hg))
        progs = max(1, min(items, TMA_PER_SM * num_sms(q.device) if q.device.type == "cuda" else 3))
        nslot = max(1, min(NSLOT, progs))
        acc = torch.zeros((nslot, 2 * d), device=q.device, dtype=torch.float32) if dw else dq
        vo = dv_out if copy_v else dq
        _tma_kernel[(progs,)](
            _desc(q, TMA_BT), _desc(k, TMA_BT), _desc(dqo, TMA_BT), _desc(dko, TMA_BT),
            _desc(dv if copy_v else dqo, TMA_BT), qw, kw, dq, dk, vo, acc, pos, cos, sin,
            bsz, t, hq, hk, *pos.stride(), cos.stride(0), ctx.eps, *dq.stride()[:3], *dk.stride()[:3],
            *vo.stride()[:3], HALF=d // 2, BT=TMA_BT, HG=hg, NSLOT=nslot, COMPUTE_DW=dw, COPY_V=copy_v, NS=TMA_STAGES,
            num_warps=TMA_WARPS, **({"maxnreg": TMA_MAXNREG} if TMA_MAXNREG else {}),
        )  # fmt: skip
    elif bwd in ("rows", "groups"):
        vs = (*dv.stride()[:3], *dv_out.stride()[:3]) if copy_v else (0,) * 6
        dvi, dvo = (dv, dv_out) if copy_v else (dq, dq)
        dw = nq or nk
        if bwd == "rows":
            progs = triton.cdiv(ntok, ROWS_BT) * (hq + hk + (hk if copy_v else 0))
        else:
            hg = max(1, min(GROUP_HG, max(hq, hk)))  # heads a program (q and k groups alike)
            ng = triton.cdiv(hq, hg) + triton.cdiv(hk, hg) * (2 if copy_v else 1)
            progs = triton.cdiv(ntok, GROUP_BT) * ng
        nslot = max(1, min(NSLOT, progs))
        acc = torch.zeros((nslot, 2 * d), device=q.device, dtype=torch.float32) if dw else dq
        args = (q, k, dqo, dko, qw, kw, dq, dk, acc, pos, cos, sin, dvi, dvo,
                t, ntok, hq, hk, *pos.stride(), cos.stride(0), ctx.eps, *strides, *vs)  # fmt: skip
        if bwd == "rows":
            _head_rows_kernel[(progs,)](
                *args, HALF=d // 2, BT=ROWS_BT, NSLOT=nslot, COMPUTE_DW=dw, COPY_V=copy_v,
                num_warps=ROWS_WARPS or (8 if ROWS_BT * d >= 8192 else 4),
            )  # fmt: skip
        else:
            _head_group_kernel[(progs,)](
                *args, HALF=d // 2, BT=GROUP_BT, HG=hg, NSLOT=nslot, COMPUTE_DW=dw, COPY_V=copy_v,
                VW=triton.next_power_of_2(hg) * d,
                PREFETCH=GROUP_PREFETCH, EV_X="evict_first" if GROUP_EVICT else "",
                EV_C="evict_last" if GROUP_EVICT else "", num_warps=GROUP_WARPS,
            )  # fmt: skip
    else:
        copy_v = False
        per_sm = PROGRAMS_PER_SM or 8  # H200 W2 sweep: 8 per SM 0.375 ms, 16 0.458, 32 0.483
        progs = max(1, min(ntok, per_sm * num_sms(q.device) if q.device.type == "cuda" else 4))
        per = triton.cdiv(ntok, progs)
        progs = triton.cdiv(ntok, per)
        acc = torch.empty((progs, 2 * d), device=q.device, dtype=torch.float32)
        warps = NUM_WARPS or (4 if (block_hq + block_hk) * d >= 2048 else 2)
        _token_kernel[(progs,)](
            q, k, dqo, dko, qw, kw, dq, dk, acc, pos, cos, sin,
            t, ntok, per, hq, hk, *pos.stride(), cos.stride(0), ctx.eps, *strides,
            HALF=d // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, COMPUTE_DW=nq or nk, num_warps=warps,
        )  # fmt: skip
    if not (nq or nk):
        return None, None, copy_v
    dqw, dkw = _split_dw(acc, qw.dtype, kw.dtype, d)
    return dqw if nq else None, dkw if nk else None, copy_v


class _QKNormRopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qw, kw, eps: float, positions, cos, sin):
        q, k = _unit_d(q), _unit_d(k)  # (B, T, H, D) projections: any (b, t, h) strides
        qo, ko = qk_norm_rope(q, k, qw, kw, eps, positions, cos, sin)
        ctx.save_for_backward(q, k, qw, kw, positions, cos, sin)
        ctx.eps, ctx.w_index = eps, 2
        return qo, ko

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):
        q, k, qw, kw, positions, cos, sin = ctx.saved_tensors
        dq, dk = (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
        )
        dqw, dkw, _ = _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk)
        return dq, dk, dqw, dkw, None, None, None, None


class _QKVNormRopeFn(torch.autograd.Function):
    """One fused (B, T, (Hq + 2 Hkv) D) q|k|v projection -> rope(norm(q)), rope(norm(k)), v (a view).

    The backward writes dq, dk and dv into one (B, T, (Hq + 2 Hkv) D) gradient, so the fused projection's
    input gradient is one GEMM and no cat of three gradients is made."""

    @staticmethod
    def forward(ctx, qkv, qw, kw, eps: float, positions, cos, sin, hq: int, hk: int):
        bsz, t, width = qkv.shape
        d = width // (hq + 2 * hk)
        q = qkv[..., : hq * d].view(bsz, t, hq, d)  # strided views of the fused row
        k = qkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        v = qkv[..., (hq + hk) * d :].view(bsz, t, hk, d)
        qo, ko = qk_norm_rope(q, k, qw, kw, eps, positions, cos, sin)
        ctx.save_for_backward(qkv, qw, kw, positions, cos, sin)
        ctx.eps, ctx.w_index, ctx.heads = eps, 1, (hq, hk, d)
        return qo, ko, v

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor, dv: torch.Tensor | None):
        qkv, qw, kw, positions, cos, sin = ctx.saved_tensors
        hq, hk, d = ctx.heads
        bsz, t, _ = qkv.shape
        dqkv = torch.empty_like(qkv)
        q = qkv[..., : hq * d].view(bsz, t, hq, d)
        k = qkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        dq = dqkv[..., : hq * d].view(bsz, t, hq, d)
        dk = dqkv[..., hq * d : (hq + hk) * d].view(bsz, t, hk, d)
        dvs = dqkv[..., (hq + hk) * d :].view(bsz, t, hk, d)
        dqw, dkw, copied = _backward(ctx, q, k, qw, kw, positions, cos, sin, dqo, dko, dq, dk, dv, dvs)
        if dv is None:
            dvs.zero_()
        elif not copied:
            _copy_rows(dv, dvs)
        return dqkv, dqw, dkw, None, None, None, None, None, None


def qk_norm_rope_train(
    q: torch.Tensor,  # (B, T, H, D)
    k: torch.Tensor,  # (B, T, Hkv, D)
    q_weight: torch.Tensor,  # (D,)
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,  # (B, T)
    cos: torch.Tensor,  # (max_pos, D/2) fp32 constants
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q, q_weight), rms_norm(k, k_weight)), differentiable in q, k and both weights."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("the cos/sin tables are constants; they must not require grad")
    if q.dtype != k.dtype or q_weight.dtype != k_weight.dtype:
        raise ValueError(f"q/k and their weights must share dtypes, got {q.dtype}, {k.dtype}")
    d = q.shape[-1]
    if d % 2 or d & (d - 1):  # the fused kernels take power-of-2 head dims; others: the three ops
        from llmray.kernels.rmsnorm import rms_norm
        from llmray.kernels.rope import rope

        return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), positions, cos, sin)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, q_weight, k_weight)):
        return _QKNormRopeFn.apply(q, k, q_weight, k_weight, eps, positions, cos, sin)
    return qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin)


def qkv_norm_rope_train(
    qkv: torch.Tensor,  # (B, T, (Hq + 2 Hkv) D): the fused q|k|v projection
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rope(norm(q)), rope(norm(k)), v) of a fused projection, differentiable in qkv and both weights;
    one (B, T, (Hq + 2 Hkv) D) input gradient (power-of-2 head dims: the callers check)."""
    if qkv.dim() != 3 or qkv.stride(-1) != 1 or qkv.shape[-1] % (num_heads + 2 * num_kv_heads):
        raise ValueError(
            f"qkv_norm_rope_train needs (B, T, (H + 2 Hkv) D) with unit last stride, got {qkv.shape}"
        )
    out = _QKVNormRopeFn.apply(qkv, q_weight, k_weight, eps, positions, cos, sin, num_heads, num_kv_heads)
    return out[0], out[1], out[2]
