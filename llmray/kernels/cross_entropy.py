"""Fused linear + cross-entropy: the mean loss of (hidden @ weight.T) without the full (tokens, vocab) logits.

Same signature and numerics as ``llmray.kernels.reference.linear_cross_entropy_ref`` (mean over targets that are
not ``ignore_index``; ``label_smoothing`` as ``F.cross_entropy``). Method (as Liger-Kernel's
fused_linear_cross_entropy): the tokens are split into chunks; per chunk, cuBLAS computes the logits
(chunk, V) in the input dtype, one Triton program per row takes an online log-sum-exp over the vocabulary
and overwrites the logits in place with d loss / d logits, and the chunk's gradients follow at once:
dH[chunk] = dlogits @ W, dW += dlogits.T @ h. So the forward already holds both gradients; the backward
only scales them by the incoming gradient. Peak extra memory is one chunk of logits plus dW and dH.

Per-row loss with smoothing eps over V classes: lse - (1 - eps) x_y - (eps / V) sum_j x_j;
its gradient: softmax - (1 - eps) onehot(y) - eps / V, divided by the number of counted targets.
All-ignored targets give a NaN loss (0 / 0, as F.cross_entropy) and zero gradients. dW is accumulated
across chunks in the weight's dtype (one rounding per chunk in bf16), as Liger does. Under autocast both
operands are cast to the autocast dtype first (as autocast casts the reference's matmul) and the fused
op runs in that dtype; the casts are differentiable, so fp32 master weights receive fp32 gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmray.kernels._common import check_device
from llmray.kernels.reference import linear_cross_entropy_ref

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "cross_entropy_rows",
    "default_chunk_size",
    "tied_embedding",
    "TiedHeadGrad",
    "scale_cast",
]


@triton.jit
def _ce_rows_kernel(
    LOGITS, stride_l, TARGETS, LOSS, N_VALID,
    V, ignore_index, smoothing,
    COMPUTE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    y = tl.load(TARGETS + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(base + y_safe).to(tl.float32)
    # pass 1: online max / sum-exp (and the plain sum of logits for smoothing)
    m = float("-inf")
    d = 0.0
    sx = 0.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(d)
    loss = lse - (1.0 - smoothing) * x_y
    if HAS_SMOOTHING:
        loss -= smoothing / V * sx
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        # every thread has read x_y before any thread overwrites the row (else a thread that finished its pass 1
        # early can store the target's gradient first: a wrong loss for that row, H200, ~1 row in thousands)
        tl.debug_barrier()
        # pass 2: overwrite the logits with d(mean loss)/d(logits)
        scale = tl.where(valid, 1.0 / tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0), 0.0)
        n_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, n_blocks):
            # REVERSE: the row's tail first, the blocks pass 1 read last (the likeliest still in L2)
            off = (n_blocks - 1 - i) * BLOCK_V if REVERSE else i * BLOCK_V
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            if HAS_SMOOTHING:
                g -= smoothing / V
            g = tl.where(cols == y_safe, g - (1.0 - smoothing), g)
            tl.store(base + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


# the rows kernel's gradient pass from the row's end, whose blocks are still in L2 (A/B in bench/train_overlap.py
# --ce): H200, 4,096 x 151,936 bf16: 0.971 vs 1.156 ms, bit-identical (bench/results/train_ce_rows.json; a grid
# capped at 1-4 programs per SM was slower, 1.13-1.63 ms, bench/results/train_overlap.json)
ROWS_REVERSE = True


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    n_valid: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compute_grad: bool = True,
) -> torch.Tensor:
    """Per-row losses (R,) fp32 of logits (R, V); with ``compute_grad`` the logits are overwritten in place
    by the gradient of sum(losses) / n_valid (``n_valid``: a one-element device tensor, no host sync)."""
    r, v = logits.shape
    loss = torch.empty(r, device=logits.device, dtype=torch.float32)
    if r == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows needs logits with unit stride along the vocabulary")
    block_v = min(triton.next_power_of_2(v), 8192 if logits.element_size() < 4 else 4096)
    _ce_rows_kernel[(r,)](
        logits, logits.stride(0), targets, loss, n_valid,
        v, ignore_index, float(label_smoothing),
        COMPUTE_GRAD=compute_grad, HAS_SMOOTHING=label_smoothing > 0, BLOCK_V=block_v, REVERSE=ROWS_REVERSE,
        num_warps=16 if block_v >= 8192 else 8,
    )  # fmt: skip
    return loss


# logits elements per chunk at most: 2 GB in bf16 (4,096 rows of a 151,936 vocabulary). Each chunk's dW GEMM
# reads and writes the whole (V, h) accumulator, so fewer chunks save that traffic: H200, qwen3-0.6b 8 x 2048
# step 188.3 ms at 2^28 (16 chunks) vs 185.4 at 2^30 (4); 2^29 and 2^31 as 2^30
CHUNK_ELEMENTS = 1 << 30


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Rows per chunk: a power of two keeping one chunk of logits at <= ``CHUNK_ELEMENTS`` elements."""
    rows = 1 << max(0, (CHUNK_ELEMENTS // max(vocab, 1)).bit_length() - 1)
    return max(1, min(rows, triton.next_power_of_2(max(n_tokens, 1))))


def _fused_forward(hidden, weight, targets, ignore_index, label_smoothing, grad_h, grad_w, chunk_size):
    """Loss (fp32 scalar) and, as asked, dH (N, h) and dW (V, h) of the mean loss."""
    n = hidden.shape[0]
    n_valid = (targets != ignore_index).sum()  # device scalar; no host sync
    losses = torch.empty(n, device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if grad_h else None
    dw = torch.empty_like(weight) if grad_w else None  # the first chunk's GEMM writes it (no fill, no read)
    if dw is not None and n == 0:
        dw.zero_()
    compute_grad = grad_h or grad_w
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]  # (c, h)
        logits = h @ weight.t()  # (c, V) in the input dtype, as the reference's matmul
        losses[start:end] = cross_entropy_rows(
            logits, targets[start:end], n_valid, ignore_index, label_smoothing, compute_grad
        )
        if dh is not None:
            torch.mm(logits, weight, out=dh[start:end])
        if dw is not None:
            if start == 0:
                torch.mm(logits.t(), h, out=dw)
            else:
                dw.addmm_(logits.t(), h)
    return losses.sum() / n_valid, dh, dw


@triton.jit
def _scale_cast_kernel(X, S, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # as torch's mul in x's dtype: the scale rounded to it, the product in fp32 rounded to it, then the cast
    s = tl.load(S).to(X.dtype.element_ty).to(tl.float32)
    x = tl.load(X + offs, mask=mask).to(tl.float32)
    tl.store(Y + offs, (x * s).to(X.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)


def scale_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(x * scale.to(x.dtype)).to(dtype)`` in one pass: x contiguous, scale a one-element device tensor.
    (torch's mul with an out of another dtype takes its slow non-vectorised path: H200, (151936, 1024) bf16 ->
    fp32: 0.61 ms, ~1.5 TB/s.) CUDA only: elsewhere torch's two ops."""
    if not x.is_contiguous() or x.device.type != "cuda":  # (the interpreter rounds bf16 otherwise)
        return (x * scale.to(x.dtype)).to(dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        block = 4096
        _scale_cast_kernel[(triton.cdiv(n, block),)](x, scale, y, n, BLOCK=block, num_warps=8)
    return y


class TiedHeadGrad:
    """The head's weight gradient of a tied embedding/head, handed from ``linear_cross_entropy`` (which
    computes it, unscaled, in its forward) to the embedding lookup's backward (``tied_embedding``), which runs
    last and returns the weight's whole gradient: dW_head * grad_loss, cast to the weight's dtype in one pass,
    plus the looked-up rows' gradients added in place. Untied, autograd would cast the head's gradient back
    (one pass), build the embedding's dense gradient (a zero fill and a scatter) and add the two (one more)."""

    def __init__(self) -> None:
        self.dw: torch.Tensor | None = None  # (V, h) in the head GEMMs' dtype, unscaled
        self.scale: torch.Tensor | None = None  # the loss's incoming gradient (a device scalar)


class _TiedEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, box: TiedHeadGrad):
        ctx.save_for_backward(ids)
        ctx.box, ctx.w_meta = box, (weight.shape, weight.dtype)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, dx: torch.Tensor):
        (ids,) = ctx.saved_tensors
        box, (shape, dtype) = ctx.box, ctx.w_meta
        if box.dw is None or box.scale is None:
            raise RuntimeError("tied_embedding: the head's gradient is missing (its linear_cross_entropy(tied=) "
                               "must be part of the same backward)")  # fmt: skip
        g = scale_cast(box.dw, box.scale, dtype)  # as the untied path: scaled in dW's dtype, then cast
        box.dw = box.scale = None
        g.index_add_(0, ids.reshape(-1), dx.reshape(-1, shape[1]).to(dtype))
        return g, None, None


def tied_embedding(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, TiedHeadGrad]:
    """``F.embedding(ids, weight)`` of a weight that is also the head of ``linear_cross_entropy(..., tied=box)``
    in the same graph: returns (embeddings, box); the weight's gradient comes out of this lookup's backward."""
    box = TiedHeadGrad()
    return _TiedEmbeddingFn.apply(weight, ids, box), box


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, label_smoothing, chunk_size, tied=None):
        loss, dh, dw = _fused_forward(
            hidden,
            weight,
            targets,
            ignore_index,
            label_smoothing,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1] or tied is not None,
            chunk_size,
        )
        if tied is not None:  # the embedding lookup's backward returns the weight's gradient
            tied.dw, dw = dw, None
        ctx.grads, ctx.tied = (dh, dw), tied
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were consumed by an earlier backward")
        dh, dw = ctx.grads
        ctx.grads = None  # the buffers are scaled in place: one backward only
        if dh is not None:
            dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        if ctx.tied is not None:
            ctx.tied.scale = grad_loss
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    tied: TiedHeadGrad | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of hidden (N, h) @ weight (V, h).T against targets (N,); differentiable in
    hidden and weight. ``chunk_size`` rows of logits exist at a time (default: ``default_chunk_size``).
    ``tied``: the box of ``tied_embedding`` over the same weight: its gradient leaves through that lookup."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden (N, h) and weight (V, h), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be integer of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_device(hidden, weight, targets)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # as autocast would run the reference's matmul: both operands in the autocast dtype (differentiable
        # casts, so an fp32 master weight gets its gradient back in fp32), then no autocast inside
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            w = weight.detach() if tied is not None else weight  # tied: no gradient through this cast
            return linear_cross_entropy(
                hidden.to(dt), w.to(dt), targets, ignore_index, label_smoothing, chunk_size, tied
            )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"linear_cross_entropy needs hidden and weight of one dtype outside autocast, got {hidden.dtype} "
            f"and {weight.dtype}"
        )
    hidden, targets = hidden.contiguous(), targets.contiguous()
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or tied is not None):
        w = weight.detach() if tied is not None else weight
        return _LinearCrossEntropyFn.apply(hidden, w, targets, ignore_index, label_smoothing, chunk, tied)
    loss, _, _ = _fused_forward(hidden, weight, targets, ignore_index, label_smoothing, False, False, chunk)
    return loss


# the model finds the tied-weight lookup beside the loss it belongs to (``ModelOps`` keeps its fields)
linear_cross_entropy.tied_embedding = tied_embedding  # type: ignore[attr-defined]
