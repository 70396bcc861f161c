"""RMSNorm and fused add + RMSNorm kernels against the torch reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

import llmray.kernels.rmsnorm as RN  # noqa: N812
from llmray.kernels.rmsnorm import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_ref,
)

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16]
# CPU (interpreter): odd row counts; 4097 rows kept narrow so the interpreter stays fast
CPU_SHAPES = [(1, 64), (7, 200), (123, 96), (4097, 24)]
GPU_SHAPES = [(1, 64), (7, 1000), (123, 4096), (4097, 1000), (4097, 128), (16384, 1024), (262144, 128)]


def _inputs(rows, width, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, width, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(device, dtype)
    dy = torch.randn(rows, width, generator=g).to(device, dtype)
    return x, w, dy


def _check_rms_norm(rows, width, dtype, device, assert_matches):
    x, w, dy = _inputs(rows, width, dtype, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = rms_norm(x, w, EPS)
    y.backward(dy)
    # reference in fp32 on the same inputs
    xr, wr = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = rms_norm_ref(xr, wr, EPS)
    yr.backward(dy.float())
    assert y.dtype == dtype
    assert_matches(y, yr, dtype, "y")
    assert_matches(x.grad, xr.grad, dtype, "dx")
    assert_matches(w.grad, wr.grad, dtype, "dw", reduced=True)


def _check_add_rms_norm(rows, width, dtype, device, assert_matches):
    x, w, dy = _inputs(rows, width, dtype, device)
    r, _, ds = _inputs(rows, width, dtype, device, seed=1)
    for t in (x, r, w):
        t.requires_grad_(True)
    y, s = add_rms_norm(x, r, w, EPS)
    torch.autograd.backward((y, s), (dy, ds))
    # reference: the sum rounded to dtype (as x + residual in torch), then the norm in fp32
    s_ref = (x.detach() + r.detach()).float().requires_grad_(True)
    wr = w.detach().float().requires_grad_(True)
    yr = rms_norm_ref(s_ref, wr, EPS)
    torch.autograd.backward((yr, s_ref), (dy.float(), ds.float()))
    assert_matches(s, s_ref, dtype, "sum")
    assert_matches(y, yr, dtype, "y")
    assert_matches(x.grad, s_ref.grad, dtype, "dx")
    assert_matches(r.grad, s_ref.grad, dtype, "dresidual")
    assert_matches(w.grad, wr.grad, dtype, "dw", reduced=True)


# the 4097-row case (more than one dW partial-sum program) in fp32 only: bf16 rounding is covered by the rest
CPU_CASES = [(r, w, d) for r, w in CPU_SHAPES for d in DTYPES if r < 4096 or d == torch.float32]


@pytest.mark.parametrize("rows,width,dtype", CPU_CASES, ids=str)
def test_rms_norm(rows, width, dtype, device, assert_matches):
    _check_rms_norm(rows, width, dtype, device, assert_matches)


@pytest.mark.parametrize("rows,width,dtype", CPU_CASES, ids=str)
def test_add_rms_norm(rows, width, dtype, device, assert_matches):
    _check_add_rms_norm(rows, width, dtype, device, assert_matches)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_launch_variants(dtype, device, assert_matches):
    """The backward's prefetching loop and one-pass dW sum + cast agree with the reference: 37 rows in
    tiles of 4 over 4 programs (a partial last tile, a program past the end), with a residual gradient."""
    x, w, dy = _inputs(37, 96, dtype, device)
    ds = _inputs(37, 96, dtype, device, seed=1)[2]
    _, _, rstd = rms_norm_fwd(x, w, EPS)
    xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
    rms_norm_ref(xr, wr, EPS).backward(dy.float())
    for prefetch, dw_sum in ((True, None), (False, (16, 32, 4)), (True, (8, 16, 2))):
        dx, dw = rms_norm_bwd(dy, x, w, rstd, ds=ds, config=(4, 4), prefetch=prefetch, dw_sum=dw_sum)
        assert dx.dtype == dw.dtype == dtype
        assert_matches(dx, xr.grad + ds.float(), dtype, f"dx {prefetch} {dw_sum}")
        assert_matches(dw, wr.grad, dtype, f"dw {prefetch} {dw_sum}", reduced=True)


def _training_bwd_inputs(rows, width, device, seed=0):
    """add_rms_norm's backward inputs under bf16 autocast: fp32 sum x, bf16 dy, fp32 ds (and rstd, w)."""
    x, w, _ = _inputs(rows, width, torch.float32, device, seed)
    dy = _inputs(rows, width, torch.bfloat16, device, seed + 1)[2]
    ds = _inputs(rows, width, torch.float32, device, seed + 2)[2]
    return x, w, rms_norm_fwd(x, w, EPS)[2], dy, ds


def _pipelined_vs_row_range(x, w, rstd, dy, ds, flags, monkeypatch):
    """(row-range kernel's dx, dx2, dw), (the pipelined kernel's with ``flags``) for the same inputs."""
    outs = []
    monkeypatch.setattr(RN, "PIPE_INTERPRET", True)
    monkeypatch.setattr(RN, "PIPE_MIN_N", 0)
    for pipelined in (False, True):
        monkeypatch.setattr(RN, "BWD_PIPELINED", pipelined)
        for k, v in (flags if pipelined else {}).items():
            monkeypatch.setattr(RN, k, v)
        dx2 = torch.full(dy.shape, 7.0, device=dy.device, dtype=torch.bfloat16)
        dx, dw = rms_norm_bwd(dy, x, w, rstd, ds=ds, dx2=dx2 if x.dtype != torch.bfloat16 else None)
        outs.append((dx, dx2, dw))
    return outs


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"PIPE_LOADS": 0, "PIPE_STORES": 2},
        {"PIPE_LOADS": 1, "PIPE_STORES": 1, "PIPE_EVICT": "evict_first"},
    ],
    ids=["pointers", "descriptors", "mixed"],
)
def test_pipelined_backward(flags, device, assert_matches, monkeypatch):
    """The persistent, pipelined backward (pointer or descriptor loads and stores) against the reference and
    the row-range kernel: 37 rows in tiles of 2 over 3 programs (a partial last tile), training's dtypes
    (fp32 dx and bf16 dx2 in one pass)."""
    x, w, rstd, dy, ds = _training_bwd_inputs(37, 256, device)
    (dx0, dx20, dw0), (dx, dx2, dw) = _pipelined_vs_row_range(x, w, rstd, dy, ds, flags, monkeypatch)
    assert RN._pipe_ok(256, dy, x, ds) and not RN._pipe_ok(96, dy[:, :96], x[:, :96])
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rms_norm_ref(xr, wr, EPS).backward(dy.float())
    assert_matches(dx, xr.grad + ds, torch.float32, "dx")
    assert_matches(dx2, dx.to(torch.bfloat16), torch.bfloat16, "dx2")
    assert_matches(dw, wr.grad, torch.float32, "dw", reduced=True)
    torch.testing.assert_close(dx, dx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-5)


def test_pipelined_backward_wide_bf16(device, assert_matches, monkeypatch):
    """2,048-wide bf16 rows by descriptors (8 x 256 boxes a row), no ds, no weight gradient."""
    x, w, dy = _inputs(5, 2048, torch.bfloat16, device)
    _, _, rstd = rms_norm_fwd(x, w, EPS)
    monkeypatch.setattr(RN, "BWD_PIPELINED", True)
    monkeypatch.setattr(RN, "PIPE_INTERPRET", True)
    monkeypatch.setattr(RN, "PIPE_MIN_N", 2048)
    monkeypatch.setattr(RN, "PIPE_LOADS", 0)
    assert RN._pipe_ok(2048, dy, x)
    dx, dw = rms_norm_bwd(dy, x, w, rstd, compute_dw=False)
    assert dw is None
    xr = x.float().requires_grad_(True)
    rms_norm_ref(xr, w.float(), EPS).backward(dy.float())
    assert_matches(dx, xr.grad, torch.bfloat16, "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width", [(16384, 1024), (4097, 4096)])
def test_pipelined_backward_bits_gpu(rows, width, monkeypatch):
    """On the GPU the pipelined backward with pointer loads (the default) gives the row-range kernel's dx and
    dx2 bit for bit (training's dtypes; H200 2026-12-01: equal at 16,384 x 1,024 and x 4,096)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w, rstd, dy, ds = _training_bwd_inputs(rows, width, "cuda")
    (dx0, dx20, dw0), (dx, dx2, dw) = _pipelined_vs_row_range(x, w, rstd, dy, ds, {}, monkeypatch)
    assert torch.equal(dx, dx0) and torch.equal(dx2, dx20)
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-4)


def test_head_norm_on_strided_views(device, assert_matches):
    """q/k RMSNorm over head_dim of (B, T, H, D) views: of a projection, and of a slice of a fused qkv."""
    torch.manual_seed(0)
    w = torch.randn(16, device=device)
    proj = torch.randn(2, 5, 4 * 16, device=device)
    q = proj.view(2, 5, 4, 16)
    assert_matches(rms_norm(q, w, EPS), rms_norm_ref(q, w, EPS), torch.float32, "view")
    qkv = torch.randn(2, 5, 8 * 16, device=device)
    k = qkv[..., 64:96].unflatten(-1, (2, 16))  # rows not at a single stride: copied
    assert_matches(rms_norm(k, w, EPS), rms_norm_ref(k, w, EPS), torch.float32, "qkv slice")
    xt = torch.randn(16, 6, device=device).t()  # last dim not unit-stride
    assert_matches(rms_norm(xt, w, EPS), rms_norm_ref(xt, w, EPS), torch.float32, "transposed")


def test_no_grad_path_and_frozen_weight(device, assert_matches):
    x, w, dy = _inputs(9, 40, torch.float32, device)
    with torch.no_grad():
        assert_matches(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), torch.float32, "no_grad")
    x.requires_grad_(True)  # weight frozen (LoRA): only dx
    rms_norm(x, w, EPS).backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    rms_norm_ref(xr, w, EPS).backward(dy)
    assert w.grad is None
    assert_matches(x.grad, xr.grad, torch.float32, "dx")


def test_rejects_mismatched_inputs(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        rms_norm(x, torch.ones(7, device=device), EPS)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, x[:2], torch.ones(8, device=device), EPS)


def _check_mixed_add_rms_norm(rows, width, device, assert_matches):
    """bf16 branch output + fp32 residual stream (fp32 weights under bf16 autocast): the sum is fp32 as
    torch's promotion makes it; outside autocast y is fp32 too, inside it is bf16 (autocast's dtype)."""
    x, _, dy = _inputs(rows, width, torch.bfloat16, device)
    r, w, ds = _inputs(rows, width, torch.float32, device, seed=1)
    for autocast in (False, True):
        xs, rs, ws = (t.detach().clone().requires_grad_(True) for t in (x, r, w))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y, s = add_rms_norm(xs, rs, ws, EPS)
        assert s.dtype == torch.float32
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.autograd.backward((y, s), (dy.to(y.dtype), ds))
        xr, rr, wr = (t.detach().clone().requires_grad_(True) for t in (x, r, w))
        yr, sr = add_rms_norm_ref(xr, rr, wr, EPS)
        torch.autograd.backward((yr, sr), (dy.to(y.dtype).float(), ds))
        assert_matches(s, sr, torch.float32, "sum")
        assert_matches(y, yr, y.dtype, "y")
        assert xs.grad.dtype == torch.bfloat16 and rs.grad.dtype == torch.float32
        # one pass writes both: the bf16 gradient is the fp32 one rounded (no separate cast kernel; the
        # interpreter rounds toward zero, a GPU to nearest, so compare within bf16's tolerance)
        assert_matches(xs.grad, rs.grad, torch.bfloat16, "dx (bf16) vs dresidual (fp32)")
        assert_matches(xs.grad, xr.grad, torch.bfloat16, "dx")
        assert_matches(rs.grad, rr.grad, torch.float32, "dresidual")
        assert_matches(ws.grad, wr.grad, torch.float32, "dw", reduced=True)


def test_add_rms_norm_mixed_dtypes(device, assert_matches):
    _check_mixed_add_rms_norm(37, 96, device, assert_matches)


def test_rms_norm_fp32_input_under_autocast(device, assert_matches):
    x, w, dy = _inputs(11, 64, torch.float32, device)
    x.requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = rms_norm(x, w, EPS)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    xr = x.detach().clone().requires_grad_(True)
    rms_norm_ref(xr, w, EPS).backward(dy.bfloat16().float())
    assert_matches(y, rms_norm_ref(x.detach(), w, EPS), torch.bfloat16, "y")
    assert x.grad.dtype == torch.float32
    assert_matches(x.grad, xr.grad, torch.float32, "dx")


def test_reference_alias():
    x, w = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(add_rms_norm_ref(x, x, w, EPS)[1], 2 * x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", GPU_SHAPES)
def test_rms_norm_gpu(rows, width, dtype, assert_matches):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_rms_norm(rows, width, dtype, "cuda", assert_matches)
    _check_add_rms_norm(rows, width, dtype, "cuda", assert_matches)
    if dtype == torch.float32:
        _check_mixed_add_rms_norm(rows, width, "cuda", assert_matches)
