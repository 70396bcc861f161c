"""Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D hidden weights, AdamW for everything else.

Sources: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024) and
github.com/KellerJordan/Muon (``MuonWithAuxAdam``); ``torch.optim.Muon`` (same update, same defaults).

One optimizer object holds both parts as parameter groups (``use_muon=True|False``), so a checkpoint is
one ``state_dict``: Muon groups keep a ``momentum_buffer`` per matrix, AdamW groups ``exp_avg``,
``exp_avg_sq`` and ``step``.

Muon update for a weight W (out, in) with gradient G:
    B <- mu B + (1 - mu) G                     (momentum, mu = 0.95)
    U <- G + mu (B - G) = lerp(G, B, mu)       (Nesterov)
    O <- NewtonSchulz5(U)                      (≈ U V^T of the SVD U S V^T, computed in bf16)
    W <- W (1 - lr wd) - lr * scale(W) * O     (decoupled weight decay, shape-aware scale)
``scale`` is ``sqrt(max(1, out/in))`` ("original", Keller Jordan) or ``0.2 sqrt(max(out, in))``
("match_rms_adamw", Moonlight: the update's RMS matches AdamW's so AdamW learning rates carry over).

Matrices of one shape are orthogonalised together as a batch (one bmm per Newton-Schulz product instead
of one matmul per matrix); with ``NS_GROUP_WIDE`` a tall weight joins the stack of its transposed shape
(Newton-Schulz runs on the wide orientation anyway: the momentum pass writes its update transposed). On one CUDA process the elementwise work is fused and overlapped
(``llmray.train.optim_kernels``): one Triton pass per matrix updates the momentum and writes the bf16
Newton-Schulz input into its stack slot, one pass applies the update; these passes and AdamW (one
``torch._fused_adamw_`` pass) run on a side stream while the main stream runs the compute-bound
Newton-Schulz products (``overlap=False`` keeps everything on one stream). Under data parallelism (``torch.distributed`` initialised) every rank holds
the same all-reduced gradients; each rank updates the momentum of every matrix (cheap, element-wise,
so every rank's state is complete and rank 0 can checkpoint it), orthogonalises only its 1/world share
of each shape group, and the new weights are all-gathered. Under FSDP2 (parameters are DTensors holding
rows of each matrix) each update matrix is brought whole to one rank, orthogonalised there, and every
rank gets its rows back (``llmray.train.fsdp.orthogonalize_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from llmray.kernels._common import interpreting
from llmray.train.fsdp import is_dtensor
from llmray.train.muon_dist import grad_of, local_tensors, momentum_buffers, muon_group_unfused
from llmray.train.optim_kernels import adamw_, muon_apply_, muon_momentum_, norm_parts

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# the symmetric Triton products (``ns_sym``) for matrices whose smaller side is at least this: below it their
# gain per step is microseconds and their compiles (five specialisations of a tl.dot kernel) cost seconds
NS_SYM_MIN_SIZE = 512
# with ``sym``, stacks at least NS_GRAM_MIN_RATIO times as wide as tall iterate on their Gram matrix
# (``newton_schulz_gram``): H200, qwen3-0.6b, 7th session W1: (1024, 3072) stacks 8.65 -> 7.35 ms, but
# (1024, 2048) ones 3.99 -> 4.17 then; 9th session, with the folded passes and TMA loads, the (1024, 2048)
# stack of q^T + o 4.06 -> 3.42 ms (error against fp32 0.0079 -> 0.0060): ratio 2; square stacks keep the plain one
NS_GRAM = True
NS_GRAM_MIN_RATIO = 2
NS_GRAM_RESTARTS = (2,)  # iterations before which the Gram iteration restarts from X (see newton_schulz_gram)
# Newton-Schulz stacks by the wide orientation (the momentum pass writes a tall weight's update transposed):
# qwen3-0.6b's q^T join o (1024, 2048), gate^T and up^T join down (1024, 3072): 3 stacks instead of 5
NS_GROUP_WIDE = True
# |X|_F^2 for Newton-Schulz's normalization from the momentum pass (partial sums per block) with ``sym``
NS_NORM_PARTS = True
# the Gram iteration's normalization and casts in its products' epilogues (newton_schulz_gram(fold=True))
NS_FOLD = True


def zeropower_via_newtonschulz5(
    g: torch.Tensor,  # (..., rows, cols): one matrix or a batch of matrices
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    sym: bool = False,
    norm_sq: torch.Tensor | None = None,  # (n,) or (n, p) fp32: |g_n|_F^2 (in partial sums), if known (sym)
) -> torch.Tensor:
    """Quintic Newton-Schulz iteration towards the orthogonal factor of ``g``, in bf16.

    The coefficients maximise the slope at zero, so singular values land in roughly [0.7, 1.2] after
    5 steps rather than exactly 1, which trains as well as the exact polar factor (Keller Jordan).
    Returns bf16 with the input's shape. ``sym``: the two symmetric products (X X^T and b A + c A^2 + a I)
    by ``llmray.kernels.newton_schulz.sym_gram`` (upper tiles only, ~56% of their FLOPs; CUDA, or CPU
    under the Triton interpreter), the same math; stacks at least three times as wide as tall (``NS_GRAM``)
    iterate on their Gram matrix instead (``newton_schulz_gram``: fewer FLOPs, fp16 Gram matrices);
    ``norm_sq`` spares them the reduction for the normalization.
    """
    if g.dim() < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (or a batch of matrices), got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    if sym and steps > 0:
        from llmray.kernels.newton_schulz import newton_schulz_gram, newton_schulz_sym

        use_gram = NS_GRAM and x.dim() == 3 and x.size(-1) >= NS_GRAM_MIN_RATIO * x.size(-2)
        if use_gram:
            x = newton_schulz_gram(x, steps, (a, b, c), eps, NS_GRAM_RESTARTS, norm_sq, fold=bool(NS_FOLD))
        else:
            x = newton_schulz_sym(x, steps, (a, b, c), eps, norm_sq)
        return x.mT if tall else x
    # spectral norm <= Frobenius norm, so this puts every singular value in [0, 1]
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    batched = x.dim() == 3
    for _ in range(steps):
        # X <- a X + (b A + c A^2) X, A = X X^T, computed as (a I + b A + c A^2) X: the a X term rides on
        # the small (r, r) polynomial's diagonal, so the big product has no C input (a baddbmm with beta != 0
        # first copies X into its output: one read + write of X per step; H200 profile, qwen3-0.6b: ~2 ms)
        if batched:
            gram = torch.bmm(x, x.mT)  # (n, r, r)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
            poly.diagonal(dim1=-2, dim2=-1).add_(a)
            x = torch.bmm(poly, x)
        else:
            gram = x @ x.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            poly.diagonal().add_(a)
            x = poly @ x
    return x.mT if tall else x


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], adjust_lr_fn: str) -> float:
    """Shape-aware Muon step size for a weight of ``shape`` (out, in)."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


class MuonWithAuxAdam(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True`` (2-D weights), AdamW for groups with ``use_muon=False``.

    Muon group keys: lr, momentum (0.95), nesterov (True), weight_decay, ns_steps (5), adjust_lr_fn.
    AdamW group keys: lr, betas, eps, weight_decay.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], overlap: bool = True) -> None:
        self.overlap = overlap  # CUDA: elementwise passes on a side stream under Newton-Schulz
        self.fused_adamw = True  # one torch._fused_adamw_ pass per group where it applies
        self.fused_passes: bool | None = None  # Muon's Triton passes: None = on CUDA tensors
        self.ns_sym = False  # Newton-Schulz's symmetric products by our Triton kernel (CUDA stacks)
        self._stream: torch.cuda.Stream | None = None
        groups = []
        for group in param_groups:
            group = dict(group)
            if "use_muon" not in group:
                raise ValueError(
                    "each parameter group needs use_muon=True (2-D hidden weights) or False (AdamW)"
                )
            if group["use_muon"]:
                group.setdefault("lr", 0.02)
                group.setdefault("momentum", 0.95)
                group.setdefault("nesterov", True)
                group.setdefault("weight_decay", 0.0)
                group.setdefault("ns_steps", 5)
                group.setdefault("adjust_lr_fn", "original")
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"Muon takes 2-D weights only; got a parameter of shape {tuple(p.shape)}: "
                            "put embeddings, norms and biases in a use_muon=False (AdamW) group"
                        )
                adjusted_lr(1.0, (1, 1), group["adjust_lr_fn"])  # validate the name now
            else:
                group.setdefault("lr", 3e-4)
                group.setdefault("betas", (0.9, 0.95))
                group.setdefault("eps", 1e-8)
                group.setdefault("weight_decay", 0.0)
            groups.append(group)
        super().__init__(groups, {})

    accepts_grad_scale = True  # step(grad_scale=...): gradient clipping folded into the update passes

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        """One step. ``grad_scale`` (a () device tensor, e.g. clipping's min(1, max_norm / norm)): every
        gradient counts as ``grad * grad_scale``; the fused passes apply it as they read the gradients
        (no pass of its own), other paths scale the gradients in place first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        local: list[dict[str, Any]] = []  # Muon groups of plain tensors on one process
        others: list[dict[str, Any]] = []  # every other group
        for group in self.param_groups:
            plain = world == 1 and not any(is_dtensor(p) for p in group["params"])
            (local if group["use_muon"] and plain else others).append(group)
        side = self._side_stream(local)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        # the momentum passes (memory-bound) go first on the side stream, AdamW after them, so both run
        # under the Newton-Schulz products (compute-bound) on the main stream
        prepared = [(g, self._muon_prepare(g, side, grad_scale)) for g in local]
        with _on(side):
            for group in others:
                if group["use_muon"]:
                    if grad_scale is not None:
                        torch._foreach_mul_(
                            local_tensors([p.grad for p in group["params"] if p.grad is not None]), grad_scale
                        )
                    self._muon_group(group)
                else:
                    self._adamw_group(group, grad_scale)
        for group, stacks in prepared:
            self._muon_finish(group, stacks, side)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return loss

    def _side_stream(self, groups: list[dict[str, Any]]) -> torch.cuda.Stream | None:
        """The stream the elementwise passes overlap on (CUDA, ``overlap``), created once."""
        if not self.overlap or not groups or not groups[0]["params"]:
            return None
        dev = groups[0]["params"][0].device
        if dev.type != "cuda":
            return None
        if self._stream is None or self._stream.device != dev:
            self._stream = torch.cuda.Stream(device=dev)
        return self._stream

    def _muon_prepare(
        self, group: dict[str, Any], side: torch.cuda.Stream | None, scale: torch.Tensor | None = None
    ) -> list[tuple]:
        """Momentum update + the Newton-Schulz input of each stack (one bf16 stack per shape, or per wide
        shape with ``NS_GROUP_WIDE``: tall weights' updates written transposed), on ``side`` if given;
        returns [(stack shape, members, stack, |X|^2 partial sums or None, event or None)], members
        [(weight shape, params, first slot)]."""
        params = [p for p in group["params"] if p.grad is not None]
        momentum_buffers(self.state, params)
        stacks: dict[tuple[int, ...], dict[tuple[int, ...], list[torch.Tensor]]] = {}
        for p in params:
            shape = tuple(p.shape)
            key = (min(shape), max(shape)) if NS_GROUP_WIDE else shape
            stacks.setdefault(key, {}).setdefault(shape, []).append(p)
        out = []
        for key, members in stacks.items():
            n = sum(len(plist) for plist in members.values())
            dev = next(iter(members.values()))[0].device
            # allocated on the main stream, which reads it last (after the event below)
            stack = torch.empty((n, *key), dtype=torch.bfloat16, device=dev)
            parts = None
            if NS_NORM_PARTS and self._ns_sym(stack):
                parts = torch.zeros((n, norm_parts(*key)), dtype=torch.float32, device=dev)
                if side is not None:  # the fill above runs on the main stream: before the side's sums
                    side.wait_stream(torch.cuda.current_stream())
            slots, start = [], 0
            with _on(side):
                for shape, plist in members.items():
                    end = start + len(plist)
                    muon_momentum_(
                        [grad_of(p) for p in plist],
                        [self.state[p]["momentum_buffer"] for p in plist],
                        stack[start:end],
                        group["momentum"],
                        group["nesterov"],
                        self.fused_passes,
                        scale,
                        transpose=shape != key,
                        parts=parts[start:end] if parts is not None else None,
                    )
                    slots.append((shape, plist, start))
                    start = end
                event = side.record_event() if side is not None else None
            out.append((key, slots, stack, parts, event))
        return out

    def _ns_sym(self, stack: torch.Tensor) -> bool:
        """Newton-Schulz of this stack on the symmetric Triton products (CUDA, or CPU under the interpreter)."""
        return self.ns_sym and (stack.is_cuda or interpreting()) and min(stack.shape[-2:]) >= NS_SYM_MIN_SIZE

    def _muon_finish(
        self, group: dict[str, Any], stacks: list[tuple], side: torch.cuda.Stream | None
    ) -> None:
        """Newton-Schulz of each stack on the current stream, then the weight update (on ``side`` if given)."""
        lr, wd = group["lr"], group["weight_decay"]
        for key, slots, stack, parts, event in stacks:
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            ortho = zeropower_via_newtonschulz5(
                stack, steps=group["ns_steps"], sym=self._ns_sym(stack), norm_sq=parts
            )  # (n, r, c) bf16
            if side is not None:
                side.wait_event(torch.cuda.current_stream().record_event())
                ortho.record_stream(side)  # its memory is not reused before the side stream has read it
            with _on(side):
                for shape, plist, start in slots:
                    o = ortho[start : start + len(plist)]
                    step_lr = adjusted_lr(lr, shape, group["adjust_lr_fn"])
                    muon_apply_(plist, o if shape == key else o.mT, 1 - lr * wd, step_lr, self.fused_passes)

    def _muon_group(self, group: dict[str, Any]) -> None:
        """Muon for a group under DDP (all-reduced gradients: each rank orthogonalises its share) or FSDP2
        (DTensor rows), or on one process without the fused passes: ``llmray.train.muon_dist``."""
        muon_group_unfused(self.state, group, zeropower_via_newtonschulz5, adjusted_lr)

    def _adamw_group(self, group: dict[str, Any], scale: torch.Tensor | None = None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0  # a Python int: no host sync per step, JSON in checkpoints
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        # every parameter of a group is created together, so they share one step count
        step = self.state[params[0]]["step"]
        grads = local_tensors([grad_of(p) for p in params])
        m = local_tensors([self.state[p]["exp_avg"] for p in params])
        v = local_tensors([self.state[p]["exp_avg_sq"] for p in params])
        params = local_tensors(params)
        if self.fused_adamw and adamw_(params, grads, m, v, step, lr, (beta1, beta2), eps, wd, scale):
            return
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / bias1)


def _on(stream: torch.cuda.Stream | None) -> Any:
    """``torch.cuda.stream(stream)``, or nothing for None."""
    import contextlib

    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
