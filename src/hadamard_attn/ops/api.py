"""The public HLA operator: resolve defaults, validate every argument, dispatch to a path."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .chunk import chunk_hadamard_attn
from .naive import naive_hadamard_attn
from .parallel import parallel_hadamard_attn
from .recurrent import recurrent_hadamard_attn, step_hadamard_attn
from .utils import feature_size, seq_bounds, state_dtype

Factors = torch.Tensor | Sequence[torch.Tensor]
State = tuple[torch.Tensor, torch.Tensor]

BACKENDS = ("auto", "naive", "parallel", "chunk", "recurrent", "triton")
STEP_BACKENDS = ("auto", "recurrent", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_factors(x: Factors, name: str, rank: int) -> tuple[torch.Tensor, ...]:
    """``[*lead, P, R]`` tensor or a sequence of P ``[*lead, R_f]`` tensors -> tuple of P tensors."""
    if isinstance(x, torch.Tensor):
        if x.dim() != rank + 1:
            raise ValueError(
                f"{name}: expected a tensor of rank {rank + 1} [{_lead(rank)}, P, R] or a sequence of P tensors "
                f"[{_lead(rank)}, R_f], got shape {tuple(x.shape)}"
            )
        if x.shape[-2] == 0:
            raise ValueError(f"{name}: the number of factors P must be >= 1, got shape {tuple(x.shape)}")
        return tuple(x.unbind(-2))
    if not isinstance(x, Sequence) or not all(isinstance(t, torch.Tensor) for t in x):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name}: the number of factors P must be >= 1, got an empty sequence")
    for f, t in enumerate(x):
        if t.dim() != rank:
            raise ValueError(f"{name}[{f}]: expected rank {rank} [{_lead(rank)}, R_f], got shape {tuple(t.shape)}")
    return tuple(x)


def _lead(rank: int) -> str:
    return "B, T, H" if rank == 4 else "B, H"


def _check_factors(q: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...], v: torch.Tensor) -> None:
    lead = v.shape[:-1]
    if len(q) != len(k):
        raise ValueError(f"q and k must have the same number of factors P, got {len(q)} and {len(k)}")
    for name, factors in (("q", q), ("k", k)):
        for f, t in enumerate(factors):
            if t.shape[:-1] != lead:
                raise ValueError(
                    f"{name}[{f}]: leading dims {tuple(t.shape[:-1])} do not match v's {tuple(lead)} ({_lead(v.dim())})"
                )
            if t.shape[-1] == 0:
                raise ValueError(f"{name}[{f}]: factor width R_f must be >= 1, got 0")
            if t.dtype != v.dtype:
                raise TypeError(f"{name}[{f}]: dtype {t.dtype} does not match v's {v.dtype}")
            if t.device != v.device:
                raise ValueError(f"{name}[{f}]: device {t.device} does not match v's {v.device}")
    for f, (qf, kf) in enumerate(zip(q, k)):
        if qf.shape[-1] != kf.shape[-1]:
            raise ValueError(
                f"q[{f}] and k[{f}] must have the same width R_{f + 1}, got {qf.shape[-1]} and {kf.shape[-1]}"
            )


def _check_v(v: torch.Tensor, rank: int) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v: expected a tensor, got {type(v).__name__}")
    if v.dim() != rank:
        raise ValueError(f"v: expected rank {rank} [{_lead(rank)}, Dv], got shape {tuple(v.shape)}")
    if v.dtype not in _DTYPES:
        raise TypeError(f"v: dtype must be one of float16, bfloat16, float32, float64, got {v.dtype}")
    if v.shape[-1] == 0:
        raise ValueError("v: Dv must be >= 1, got 0")


def check_eps(eps: float) -> None:
    """``eps`` must be a finite real number >= 0 (not a bool)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: must be a finite number >= 0, got {eps!r}")


def check_flag(value: bool, name: str) -> None:
    """Flags are real bools: ``causal="no"`` must not silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def check_backend(backend: str, causal: bool | None = None) -> None:
    """``backend`` is one of :data:`BACKENDS` and, when ``causal`` is known, a path that computes that mode."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend == "parallel" and causal:
        raise ValueError("backend='parallel' is the non-causal path; use 'chunk' or 'recurrent' with causal=True")
    if backend in ("chunk", "recurrent") and causal is False:
        raise ValueError(f"backend={backend!r} is a causal path; use 'parallel' with causal=False")


def _check_state(state: State, N: int, H: int, M: int, Dv: int, v: torch.Tensor, name: str) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name}: expected a pair (S [N, H, M, Dv], z [N, H, M]), got {type(state).__name__}")
    S, z = state
    sd = state_dtype(v.dtype)
    for part, t, shape in ((f"{name}[0] (S)", S, (N, H, M, Dv)), (f"{name}[1] (z)", z, (N, H, M))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{part}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{part}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != sd:
            raise TypeError(f"{part}: states are {sd} for {v.dtype} inputs, got {t.dtype}")
        if t.device != v.device:
            raise ValueError(f"{part}: device {t.device} does not match v's {v.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, v: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor [N + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: dtype must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != v.device:
        raise ValueError(f"cu_seqlens: device {cu_seqlens.device} does not match v's {v.device}")
    if B != 1:
        raise ValueError(f"cu_seqlens: sequences must be packed into batch size 1, got B = {B}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens: needs at least two offsets [0, T]")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {offsets[0]}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"cu_seqlens: must be strictly increasing, got {offsets}")
    if offsets[-1] != T:
        raise ValueError(f"cu_seqlens: must end at T = {T}, got {offsets[-1]}")


def _triton_reason(q, k, v, causal) -> str | None:
    """None when the Triton kernels can run these inputs (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    try:
        from . import triton as triton_ops
    except ImportError as e:
        return f"Triton is not installed ({e}); pip install hadamard-attn[triton]"
    return triton_ops.unsupported_reason(q, k, v, causal)


def _run(path, q, k, v, causal, normalize, eps, initial_state, output_final_state, cu_seqlens):
    if path == "naive":
        return naive_hadamard_attn(q, k, v, causal, normalize, eps, initial_state, output_final_state, cu_seqlens)
    if path == "triton":
        from .triton import triton_hadamard_attn

        # hadamard_attn has had _triton_reason return None for these inputs
        return triton_hadamard_attn(
            q, k, v, causal, normalize, eps, initial_state, output_final_state, cu_seqlens, supported=True
        )
    fn = {"parallel": parallel_hadamard_attn, "chunk": chunk_hadamard_attn, "recurrent": recurrent_hadamard_attn}[path]
    if cu_seqlens is None:
        return fn(q, k, v, normalize, eps, initial_state, output_final_state)
    # the torch paths run packed sequences one by one; the Triton kernels take cu_seqlens natively
    outs, states = [], []
    for n, (s, e) in enumerate(seq_bounds(cu_seqlens)):
        init = None if initial_state is None else (initial_state[0][n : n + 1], initial_state[1][n : n + 1])
        o, st = fn(
            tuple(x[:, s:e] for x in q),
            tuple(x[:, s:e] for x in k),
            v[:, s:e],
            normalize,
            eps,
            init,
            output_final_state,
        )
        outs.append(o)
        states.append(st)
    final = None
    if output_final_state:
        final = (torch.cat([st[0] for st in states]), torch.cat([st[1] for st in states]))
    return torch.cat(outs, dim=1), final


def hadamard_attn(
    q: Factors,
    k: Factors,
    v: torch.Tensor,
    *,
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    r"""Hadamard Linear Attention.

    ``A = (a_1(Q) b_1(K)^T) * ... * (a_P(Q) b_P(K)^T)`` (element-wise product of P linear-attention similarity
    matrices), ``o = A V / (A 1 + eps)``, computed through a state of size ``M x Dv`` with
    ``M = R_1 * ... * R_P``, never forming the ``T x T`` matrix.

    Args:
        q: query features, non-negative (feature maps are applied by the caller): a tensor ``[B, T, H, P, R]``
            (all factors of width R) or a sequence of P tensors ``[B, T, H, R_f]`` whose widths may differ.
        k: key features, in the same form as ``q``; factor f of ``k`` has the width of factor f of ``q``.
        v: values ``[B, T, H, Dv]``.
        causal: token i attends to tokens j <= i (and to ``initial_state``). Non-causal: every token attends
            to ``initial_state`` and to every token of its sequence in this call.
        normalize: divide by the row sums ``A 1 + eps`` (default) or return ``A V``.
        eps: added to the denominator, >= 0.
        initial_state: ``(S [N, H, M, Dv], z [N, H, M])`` in fp32 (fp64 for fp64 inputs), the sums
            ``sum_j phi(k_j) v_j^T`` and ``sum_j phi(k_j)`` of earlier tokens, with ``phi`` the row-major
            Khatri-Rao product of the key factors (factor 1 slowest). N = B, or the number of sequences.
        output_final_state: also return the state after this call's tokens.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed into ``B == 1`` (FlashAttention/fla style).
        backend: ``"auto"`` (Triton on CUDA where supported, else ``"parallel"`` / ``"chunk"``), ``"naive"``,
            ``"parallel"`` (non-causal), ``"chunk"`` (causal), ``"recurrent"`` (causal) or ``"triton"``.

    Returns:
        ``(o, state)``: ``o [B, T, H, Dv]`` in ``v.dtype``; ``state = (S, z)`` if ``output_final_state``
        else None.
    """
    _check_v(v, 4)
    q, k = _as_factors(q, "q", 4), _as_factors(k, "k", 4)
    _check_factors(q, k, v)
    check_eps(eps)
    check_flag(causal, "causal")
    check_flag(normalize, "normalize")
    check_flag(output_final_state, "output_final_state")
    check_backend(backend, causal)
    B, T, H, Dv = v.shape
    if T == 0:
        raise ValueError("v: sequence length T must be >= 1, got 0")
    M = feature_size(q)
    N = B
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, T, v)
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state(initial_state, N, H, M, Dv, v, "initial_state")

    if backend == "auto":
        if v.is_cuda and _triton_reason(q, k, v, causal) is None:
            backend = "triton"
        else:
            backend = "chunk" if causal else "parallel"
    elif backend == "triton":
        reason = _triton_reason(q, k, v, causal)
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}")
    return _run(backend, q, k, v, causal, normalize, eps, initial_state, output_final_state, cu_seqlens)


def _step_path(backend: str, cuda: bool, needs_grad: bool, triton_reason: Callable[[], str | None]) -> str:
    """The path of a decode step: ``"auto"`` takes ``"triton"`` on CUDA where the kernel takes the inputs
    (``triton_reason()`` is None) and no gradient is needed, else ``"recurrent"``; ``"triton"`` refuses inputs
    that need gradients or that the kernel does not take."""
    if backend == "auto":
        return "triton" if cuda and not needs_grad and triton_reason() is None else "recurrent"
    if backend == "triton":
        reason = "the Triton step has no backward" if needs_grad else triton_reason()
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}")
    return backend


def hadamard_attn_step(
    q: Factors,
    k: Factors,
    v: torch.Tensor,
    state: State | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """One causal decode step: add token t to the state, then read it with the query.

    Args:
        q, k: the token's features, a tensor ``[B, H, P, R]`` or a sequence of P tensors ``[B, H, R_f]``.
        v: ``[B, H, Dv]``.
        state: ``(S [B, H, M, Dv], z [B, H, M])`` from :func:`hadamard_attn` with ``output_final_state=True``
            or from an earlier step; None starts from an empty state.

        backend: ``"auto"`` (the Triton kernel on CUDA where it takes the inputs and no gradient is needed, else
            ``"recurrent"``), ``"recurrent"`` (torch, differentiable) or ``"triton"`` (one fused kernel that reads
            and writes the state once; inference only).

    Returns:
        ``(o [B, H, Dv], new_state)``; equal to the causal ``hadamard_attn`` output for that token. The new state
        is a new pair of tensors; ``state`` is not modified.
    """
    _check_v(v, 3)
    q, k = _as_factors(q, "q", 3), _as_factors(k, "k", 3)
    _check_factors(q, k, v)
    check_eps(eps)
    check_flag(normalize, "normalize")
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend: expected one of {STEP_BACKENDS} for a decode step, got {backend!r}")
    B, H, Dv = v.shape
    if state is not None:
        _check_state(state, B, H, feature_size(q), Dv, v, "state")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*q, *k, v, *(state or ())))
    backend = _step_path(backend, v.is_cuda, needs_grad, lambda: _triton_reason(q, k, v, True))
    if backend == "triton":
        from .triton import step_hadamard_attn_triton

        return step_hadamard_attn_triton(q, k, v, state, normalize, eps)
    return step_hadamard_attn(q, k, v, state, normalize, eps)
