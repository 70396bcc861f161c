"""Triton kernels: one module per op (kernel + launcher + torch ``*_ref`` + autograd.Function).

- ``rmsnorm``: RMSNorm and fused residual-add + RMSNorm, forward and backward.
- ``rope``: rotary embedding of q and k from per-token positions, forward and backward.
- ``swiglu``: silu(gate) * up, forward and backward.
- ``cross_entropy``: fused linear + cross-entropy, chunked over tokens (no full logits).
- ``reference``: the plain-torch references (``*_ref``) of the model ops; no triton import.

Submodules are imported on use, not here: ``@triton.jit`` decides at decoration time whether kernels run
in the CPU interpreter (``TRITON_INTERPRET=1``), so importing this package must not define any kernel.
"""
