"""Triton kernels of paged decode attention and the helpers the launchers share (launchers, docs and the torch
reference: ``paged_attention.py``; prefill kernels: ``_paged_prefill_kernels.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmray.kernels.kv_store import is_fp8

LOG2E = 1.4426950408889634


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    if precision is not None:
        return precision
    return "ieee" if dtype == torch.float32 else "tf32"


def _compute_dtype(dtype: torch.dtype, fp8: bool):
    """Dot inputs: the query's dtype, but fp16 for an fp8 cache under bf16 (a native e4m3 conversion)."""
    if fp8 and dtype == torch.bfloat16:
        return tl.float16
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# --- what every paged-attention launch passes alike (decode, per-head prefill, split prefill) --------------
def cache_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, dummy: torch.Tensor
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(fp8, k_scale, v_scale) arguments: an fp8 cache needs both (1,) fp32 scales (ValueError otherwise);
    another cache passes ``dummy``, a pointer the kernel never reads."""
    if not is_fp8(k_cache):
        return False, dummy, dummy
    if k_scale is None or v_scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    return True, k_scale, v_scale


def scale_and_strides(
    q: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor, scale: float
) -> tuple:
    """The arguments after the pointers: softmax scale * log2(e); q's and out's (token, head) strides; the
    block table's row stride; the cache's (block, slot, head) strides (V's equal K's)."""
    return (scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))  # fmt: skip


def shape_meta(q: torch.Tensor, k_cache: torch.Tensor, precision: str | None, fp8: bool) -> dict:
    """The constexprs every paged-attention kernel takes: heads, GQA group, head dim, page size, dot precision
    and input dtype, cache kind."""
    _, h, d = q.shape
    _, page, hkv, _ = k_cache.shape
    return dict(H=h, GROUP=h // hkv, D=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page,
                PRECISION=_precision(q.dtype, precision), FP8=fp8,
                CDT=_compute_dtype(q.dtype, fp8))  # fmt: skip


@triton.jit
def _e4m3_to_f16(x):
    """e4m3 -> fp16 by two cvt.rn.f16x2.e4m3x2 per 4 elements, as an opaque op: Triton keeps it in the load's
    layout instead of fusing the conversion into the dot operand (an 8-bit V tile read back transposed one
    byte per shared-memory load), and no multiply is needed to anchor it (the scale goes on the output)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r",
        [x],
        dtype=tl.float16,
        is_pure=False,
        pack=4,
    )


@triton.jit
def _page_slot(
    table_ptr,
    n0,
    offs,
    nmask,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FAST: tl.constexpr,
    I64: tl.constexpr,
):
    """Page id and in-page slot of tokens offs = n0 + arange(BLOCK_N). FAST with n0 a multiple of PAGE: from
    the tile's row number (no per-token signed division); I64: 64-bit page ids (offsets past 2^31)."""
    if FAST and BLOCK_N % PAGE == 0:
        rows = tl.arange(0, BLOCK_N)
        page = tl.load(table_ptr + n0 // PAGE + rows // PAGE, mask=nmask, other=0)
        slot = rows % PAGE
    else:
        page = tl.load(table_ptr + offs // PAGE, mask=nmask, other=0)
        slot = offs % PAGE
    if I64:
        page = page.to(tl.int64)
    return page, slot


@triton.jit
def _kv_rows(
    table_ptr, n0, end, kvh, dmask, stride_cb, stride_cs, stride_ch,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Keys [n0, n0 + BLOCK_N) of one sequence (``table_ptr``: its block-table row), those below ``end``:
    positions (BLOCK_N,), their mask, the cache offsets of KV head ``kvh``'s rows (BLOCK_N,) and the K/V tile's
    load mask (BLOCK_N, BLOCK_D)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    nmask = offs < end
    page, slot = _page_slot(table_ptr, n0, offs, nmask, PAGE, BLOCK_N, FAST, I64)
    addr = page * stride_cb + slot * stride_cs + kvh * stride_ch
    return offs, nmask, addr, nmask[:, None] & dmask[None, :]


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_ptr,  # INDIRECT: sequence b's query token is query_start[b] (skipped unless its q_len is 1)
    k_scale_ptr,  # FP8: (1,) fp32 scales of the cache
    v_scale_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    INDIRECT: tl.constexpr,
    FP8: tl.constexpr,
    CDT: tl.constexpr,  # dot input dtype (fp16 for an fp8 cache under bf16: e4m3 -> f16 is one instruction)
    PREFETCH: tl.constexpr = False,  # load tile i+1 (pages, K, V) into registers before computing tile i
    HEADS_FAST: tl.constexpr = False,  # grid (Hkv, B, splits): a sequence's KV heads run side by side
    V_SCALE_FIRST: tl.constexpr = False,  # FP8: V tile times its scale in CDT before the P.V dot (see below)
    KV_HEADS: tl.constexpr = 1,  # KV heads per program: 2 reads a token's two adjacent head rows as one row
    TRANS: tl.constexpr = False,  # S^T = K q^T and O^T = V^T P^T: tokens on the dots' M side (see below)
    V_ASM: tl.constexpr = False,  # FP8 (GPU only): V converted by inline PTX in registers, scaled at the end
    FAST_ADDR: tl.constexpr = False,  # page/slot from the tile's row (BLOCK_N % PAGE == 0); I64 below
    I64: tl.constexpr = True,  # 64-bit cache offsets (False: the launcher found the cache < 2^31 elements)
):
    if HEADS_FAST:
        kvh = tl.program_id(0) * KV_HEADS
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1) * KV_HEADS
    split = tl.program_id(2)
    tok = b
    if INDIRECT:
        tok = tl.load(query_start_ptr + b)
        if tl.load(query_start_ptr + b + 1) - tok != 1:
            return  # a prefill chunk (the prefill kernel's) or a padding sequence
    ctx = tl.load(context_lens_ptr + b)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    # An 8-bit V tile converted right before the dot is staged in shared memory as 8-bit and read back
    # transposed one byte per load (no 8-bit ldmatrix.trans); a multiply after the conversion keeps the
    # conversion in registers, so the 16-bit tile goes through shared memory with transposing ldmatrix.
    vs = tl.load(v_scale_ptr).to(CDT) if FP8 and V_SCALE_FIRST and not V_ASM else 1.0
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    table = block_tables_ptr + b * stride_bt  # (this sequence's block-table row)
    g = tl.arange(0, BLOCK_G)
    heads = kvh * GROUP + g
    gmask = g < GROUP * KV_HEADS
    if KV_HEADS == 1:
        cols = tl.arange(0, BLOCK_D)  # column c of a K/V tile row = dim c of head kvh
        d = cols
        dmask = d < D
        own = gmask[:, None] & dmask[None, :]
    else:  # KV_HEADS head rows side by side (BLOCK_D == D): a query row uses its own head's columns only
        cols = tl.arange(0, KV_HEADS * BLOCK_D)
        d = cols % BLOCK_D
        dmask = d < D
        own = gmask[:, None] & ((g // GROUP)[:, None] == (cols // BLOCK_D)[None, :])
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=own, other=0.0).to(
        CDT
    )  # (BLOCK_G, KV_HEADS * BLOCK_D), zero outside a row's own head

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, KV_HEADS * BLOCK_D], tl.float32)
    if PREFETCH:
        # register double buffering: the next tile's page ids, K and V are in flight during this tile's math
        _, nmask, addr, kv_mask = _kv_rows(
            table, start, end, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, False, True
        )
        k = tl.load(k_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
        for n0 in range(start, end, BLOCK_N):
            nx = n0 + BLOCK_N
            _, nmask_nx, addr_nx, mask_nx = _kv_rows(
                table, nx, end, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, False, True
            )
            k_nx = tl.load(k_cache_ptr + addr_nx[:, None] + cols[None, :], mask=mask_nx, other=0.0)
            v_nx = tl.load(v_cache_ptr + addr_nx[:, None] + cols[None, :], mask=mask_nx, other=0.0)
            s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            vc = v.to(CDT) * vs if FP8 and V_SCALE_FIRST else v.to(CDT)
            acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc, input_precision=PRECISION)
            m = m_new
            k, v, nmask = k_nx, v_nx, nmask_nx
    elif TRANS:
        # Tokens as the dots' M side and the GQA group as N (BLOCK_G may be 2-8: no padding to 16 rows): half
        # the mma instructions, and the softmax runs over BLOCK_G columns instead of 16 padded rows. sm_90 SASS
        # for an fp8 cache (64, 2, 5): 764 instructions per tile and warp vs 990 (~24 vs ~31 per token).
        q_t = tl.trans(q)  # (BLOCK_D, BLOCK_G)
        m_t = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_G], tl.float32)
        acc_t = tl.zeros([KV_HEADS * BLOCK_D, BLOCK_G], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            _, nmask, addr, kv_mask = _kv_rows(
                table, n0, end, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, FAST_ADDR, I64
            )
            # (BLOCK_N, KV_HEADS * BLOCK_D)
            k = tl.load(k_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            s_t = tl.dot(k.to(CDT), q_t, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_G)
            s_t = tl.where(nmask[:, None], s_t, float("-inf"))
            m_new = tl.maximum(m_t, tl.max(s_t, 0))
            p_t = tl.exp2(s_t - m_new[None, :])
            alpha = tl.exp2(m_t - m_new)
            l_t = l_t * alpha + tl.sum(p_t, 0)
            v = tl.load(v_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            if FP8 and V_ASM:
                v = _e4m3_to_f16(v)
            else:
                v = v.to(CDT) * vs if FP8 and V_SCALE_FIRST else v.to(CDT)
            acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p_t.to(v.dtype), input_precision=PRECISION)
            m_t = m_new
        acc = tl.trans(acc_t)  # (BLOCK_G, BLOCK_D)
        m = m_t
        l_sum = l_t
    else:
        for n0 in range(start, end, BLOCK_N):
            _, nmask, addr, kv_mask = _kv_rows(
                table, n0, end, kvh, dmask, stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, FAST_ADDR, I64
            )
            # (BLOCK_N, KV_HEADS * BLOCK_D)
            k = tl.load(k_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(CDT)), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            if FP8 and V_ASM:
                v = _e4m3_to_f16(v)
            else:
                v = v.to(CDT) * vs if FP8 and V_SCALE_FIRST else v.to(CDT)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
    if FP8 and (V_ASM or not V_SCALE_FIRST):
        acc = acc * tl.load(v_scale_ptr)

    omask = own  # each output element from its own head's columns
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )
    else:
        nonempty = l_sum > 0
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_sum, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l_sum, 1.0)), float("-inf"))  # base 2
        row = (b * H + heads) * NUM_SPLITS + split  # part_out (B, H, S, D), part_lse (B, H, S)
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=omask)
        tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    query_start_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INDIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = b
    if INDIRECT:
        tok = tl.load(query_start_ptr + b)
        if tl.load(query_start_ptr + b + 1) - tok != 1:
            return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    row = (b * H + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + row, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    w = tl.where(smask, w, 0.0)
    o = tl.load(
        part_out_ptr + row[:, None] * D + d[None, :], mask=smask[:, None] & (d[None, :] < D), other=0.0
    )
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
