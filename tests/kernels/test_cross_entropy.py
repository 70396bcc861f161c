"""Fused linear + cross-entropy against linear_cross_entropy_ref: loss, dH and dW.

Reference choice: in bf16 both paths compute the logits with a bf16 GEMM (rounded to bf16) before the
fp32 softmax, so the kernel is compared with the torch reference run in the same dtype: the loss to
1e-3 relative (a chunked GEMM may round a logit differently by one bf16 ulp), dH/dW norm-wise to 2e-2
(the gradient of the logits is rounded to bf16 before its GEMMs in both paths, and dW is accumulated
across chunks in bf16). In fp32 everything agrees to fp32 accuracy (1e-5; 1e-4 on the GPU's GEMMs).
"""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.cross_entropy import default_chunk_size, linear_cross_entropy, linear_cross_entropy_ref

LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (N tokens, hidden, vocab, label_smoothing, chunk rows, dtype); chunks smaller than N exercise chunking
CPU_CASES = [
    (1, 16, 50, 0.0, None, torch.float32),
    (7, 32, 1000, 0.1, 2, torch.float32),
    (37, 64, 3000, 0.0, 16, torch.float32),  # 3 chunks, a partial last one (123 rows on the GPU)
    (37, 64, 3000, 0.2, 16, torch.bfloat16),
    (257, 16, 64, 0.1, 100, torch.float32),  # 4097 rows run on the GPU (the interpreter is slow per row)
]
GPU_CASES = [
    (1, 1024, 151936, 0.0, None, torch.bfloat16),
    (123, 1000, 32000, 0.1, 64, torch.float32),
    (4097, 512, 50000, 0.0, 1024, torch.float32),
    (4097, 1024, 151936, 0.0, None, torch.bfloat16),
    (4097, 1024, 151936, 0.1, 512, torch.bfloat16),
]


def _check(n, hidden, vocab, smoothing, chunk, dtype, device, assert_normwise, grad_scale=2.0, gpu=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hidden, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[1::5] = -100  # ignored positions (padding / prompt tokens)
    targets = targets.to(device)
    loss = linear_cross_entropy(h, w, targets, label_smoothing=smoothing, chunk_size=chunk)
    (grad_scale * loss).backward()
    hr, wr = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    loss_ref = linear_cross_entropy_ref(hr, wr, targets, label_smoothing=smoothing)
    (grad_scale * loss_ref).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    rtol = LOSS_RTOL[dtype] * (10 if gpu and dtype == torch.float32 else 1)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0.0)
    rel = GRAD_REL[dtype] * (10 if gpu and dtype == torch.float32 else 1)
    assert_normwise(h.grad, hr.grad, rel, "dH")
    assert_normwise(w.grad, wr.grad, rel, "dW")


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_linear_cross_entropy(case, device, assert_normwise):
    _check(*case, device, assert_normwise)


def test_all_ignored_gives_nan_and_zero_grads(device):
    h = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(10, 8, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss = linear_cross_entropy(h, w, t)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(h, w, t))  # 0 / 0 as F.cross_entropy
    loss.backward()
    assert not h.grad.any() and not w.grad.any()


def test_frozen_weight_and_no_grad(device, assert_normwise):
    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(9, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(70, 16, generator=g).to(device)  # frozen head (LoRA): only dH
    t = torch.randint(0, 70, (9,), generator=g).to(device)
    linear_cross_entropy(h, w, t, chunk_size=4).backward()
    hr = h.detach().clone().requires_grad_(True)
    linear_cross_entropy_ref(hr, w, t).backward()
    assert_normwise(h.grad, hr.grad, 1e-5, "dH")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), linear_cross_entropy_ref(h, w, t))


def test_one_backward_only(device):
    h = torch.randn(3, 8, device=device, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(5, 8, device=device), torch.tensor([0, 1, 2], device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed by an earlier backward"):
        loss.backward()


def test_fp32_weights_under_bf16_autocast(device, assert_normwise):
    """The training setup: fp32 hidden and (master) weight under bf16 autocast, as the reference runs it."""
    g = torch.Generator(device="cpu").manual_seed(3)
    h = torch.randn(40, 32, generator=g).to(device).requires_grad_(True)
    w = (0.2 * torch.randn(300, 32, generator=g)).to(device).requires_grad_(True)
    t = torch.randint(0, 300, (40,), generator=g).to(device)
    hr, wr = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=16)
        ref = linear_cross_entropy_ref(hr, wr, t)
    loss.backward()
    ref.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0.0)
    assert_normwise(h.grad, hr.grad, 2e-2, "dh")
    assert_normwise(w.grad, wr.grad, 2e-2, "dw")


def test_rejects_bad_inputs(device):
    h, w = torch.randn(3, 8, device=device), torch.randn(5, 8, device=device)
    with pytest.raises(ValueError, match="targets must be integer"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="weight \\(V, h\\)"):
        linear_cross_entropy(h, w[:, :4], torch.zeros(3, dtype=torch.long, device=device))


def test_default_chunk_size_bounds_logits():
    assert default_chunk_size(16384, 151936) == 4096  # 4096 x 151936 logits <= 2^30 elements
    assert default_chunk_size(100, 512) == 128  # small problems: one chunk
    assert default_chunk_size(1, 10**9) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_linear_cross_entropy_gpu(case, assert_normwise):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check(*case, "cuda", assert_normwise, gpu=True)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_tied_embedding_gradient_equals_untied(autocast, device):
    """A weight used as embedding and as the loss's head: ``tied_embedding`` + ``linear_cross_entropy(tied=)``
    give the same loss and the same weight gradient (head part scaled by the loss's gradient, repeated ids
    accumulated) as the plain lookup + loss, where autograd adds the two gradients; fp32 master weight under
    bf16 autocast too (the training setup)."""
    from llmray.kernels.cross_entropy import tied_embedding

    g = torch.Generator(device="cpu").manual_seed(4)
    w0 = (0.3 * torch.randn(90, 16, generator=g)).to(device)
    mix = torch.randn(16, 16, generator=g).to(device)
    ids = torch.tensor([[3, 7, 3, 89], [0, 7, 7, 5]], device=device)  # repeated ids: accumulated rows
    t = torch.randint(0, 90, (8,), generator=g).to(device)
    losses, grads = [], []
    for tied in (True, False):
        w = w0.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            x, box = tied_embedding(w, ids) if tied else (torch.nn.functional.embedding(ids, w), None)
            h = torch.tanh(x.float() @ mix).reshape(-1, 16)
            loss = linear_cross_entropy(h, w, t, chunk_size=4, tied=box)
        (3.0 * loss).backward()  # a loss gradient != 1
        losses.append(loss.detach())
        grads.append(w.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    tol = 1e-6 if device == "cpu" else 1e-5  # CUDA's index_add_ adds repeated rows in any order
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol / 10)


def test_tied_embedding_without_its_loss_is_an_error(device):
    from llmray.kernels.cross_entropy import tied_embedding

    w = torch.randn(10, 4, device=device, requires_grad=True)
    x, _ = tied_embedding(w, torch.tensor([[1, 2]], device=device))
    with pytest.raises(RuntimeError, match="head's gradient is missing"):
        x.sum().backward()


@pytest.mark.parametrize("n", [0, 5, 4096 + 3])
def test_scale_cast_matches_torch(n, device):
    """The tied head's one-pass scale + cast equals torch's mul in the input dtype followed by the cast."""
    from llmray.kernels.cross_entropy import scale_cast

    x = torch.randn(n, device=device).to(torch.bfloat16)
    s = torch.tensor(0.37, device=device)
    want = (x * s.to(x.dtype)).to(torch.float32)
    got = scale_cast(x, s, torch.float32)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_rows_losses_every_row():
    """Every row's loss, not just the mean: the target's logit must be read before the gradient pass overwrites
    the row (a race that gave ~1 row in thousands a wrong loss on the H200)."""
    import llmray.kernels.cross_entropy as ce

    g = torch.Generator(device="cpu").manual_seed(2)
    logits = (4 * torch.randn(4096, 151936, generator=g)).to("cuda", torch.bfloat16)
    t = torch.randint(0, 151936, (4096,), generator=g).to("cuda")
    want = torch.nn.functional.cross_entropy(logits.float(), t, reduction="none")
    for _ in range(3):
        got = ce.cross_entropy_rows(logits.clone(), t, torch.tensor(4096, device="cuda"))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
