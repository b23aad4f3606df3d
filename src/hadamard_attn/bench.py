"""``hla bench``: softmax attention (SDPA) against P = 1 linear attention and HLA, over sequence lengths.

Every path is first checked against a float64 reference on a small input (forward and every gradient); a path
that fails is refused, not timed. Then each (length, path, causal, mode) is run once as a warm-up, which also
measures its peak memory, and timed: medians of ``time.perf_counter`` on CPU, of ``triton.testing.do_bench`` on
CUDA.

FLOP accounting (per call; B sequences, H heads, N tokens, value dim Dv; a multiply-add is 2 FLOPs):

- SDPA: ``4 B H N^2 Dv`` (Q K^T and A V), half of it when causal.
- HLA, non-causal, ``M = R_1 ... R_P``: state build ``2 B H N M (Dv + 1)`` (the values plus the column of ones
  that gives the denominator) and read-out as much, ``4 B H N M (Dv + 1)``, plus forming the Khatri-Rao features
  of q and k, ``2 B H N (R_1 R_2 + R_1 R_2 R_3 + ...)`` products.
- HLA, causal: the same state terms (every token is read from and added to the state once), plus the explicit
  C x C blocks of the chunked path, counted in full although they are masked: P similarity matmuls, P - 1
  Hadamard products and A V, ``B H N C (2 (R_1 + ... + R_P) + (P - 1) + 2 (Dv + 1))``, with C = ``CHUNK``.
- forward + backward: 3.5 x forward for every path (backward = 2.5 x forward, the convention of Triton's
  fused-attention tutorial: recomputation plus two gradient products per forward product).

Only the attention is timed. Feature maps are not: the operator takes features, SDPA takes q and k of head dim Dv.
"""

from __future__ import annotations

import csv
import inspect
import math
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from .ops import chunk_hadamard_attn, hadamard_attn
from .testing import rel_rms

CHUNK = inspect.signature(chunk_hadamard_attn).parameters["chunk_size"].default
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")
BACKENDS = ("auto", "torch", "triton")
# relative RMS error against the float64 reference above which a path is refused
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CHECK_SHAPE = (2, 150, 2)  # B, T, H of the correctness check: T spans several chunks and is not a multiple of one
MIN_TIME_S = 0.2  # CPU: keep repeating short runs until this much time is spent (at most MAX_RUNS runs)
MAX_RUNS = 100


@dataclass(frozen=True)
class AttnPath:
    """One timed attention: SDPA (``widths=None``) or HLA with factor widths ``(R_1, ..., R_P)``."""

    widths: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        if self.widths is None:
            return "sdpa"
        kind = "linear" if len(self.widths) == 1 else "HLA"
        return f"{kind} {'x'.join(map(str, self.widths))}"

    @property
    def M(self) -> int | None:
        return None if self.widths is None else math.prod(self.widths)

    def inputs(self, B, T, H, Dv, dtype, device, requires_grad, gen) -> list[torch.Tensor]:
        """SDPA: ``[q, k, v]``, each ``[B, H, T, Dv]``. HLA: ``[q_1..q_P, k_1..k_P, v]``, features ``[B, T, H, R_f]``
        in [0, 1) (non-negative, as from a feature map), ``v [B, T, H, Dv]``."""
        if self.widths is None:
            xs = [torch.randn(B, H, T, Dv, generator=gen, device=device) for _ in range(3)]
        else:
            feats = [torch.rand(B, T, H, r, generator=gen, device=device) for r in self.widths * 2]
            xs = [*feats, torch.randn(B, T, H, Dv, generator=gen, device=device)]
        return [x.to(dtype).requires_grad_(requires_grad) for x in xs]

    def forward(self, xs: list[torch.Tensor], causal: bool, backend: str) -> torch.Tensor:
        """The attention output; ``backend`` is one of ``BACKENDS`` or ``"naive"`` (HLA only)."""
        if self.widths is None:
            return F.scaled_dot_product_attention(*xs, is_causal=causal)
        P = len(self.widths)
        if backend == "torch":
            backend = "chunk" if causal else "parallel"
        return hadamard_attn(xs[:P], xs[P : 2 * P], xs[-1], causal=causal, backend=backend)[0]

    def reference(self, xs: list[torch.Tensor], causal: bool) -> torch.Tensor:
        """float64 ground truth: explicit softmax for SDPA, the ``naive`` path for HLA."""
        if self.widths is not None:
            return self.forward(xs, causal, "naive")
        q, k, v = xs
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, T]
        if causal:
            s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), -math.inf)
        return s.softmax(-1) @ v

    def flop(self, B: int, T: int, H: int, Dv: int, causal: bool, mode: str) -> float:
        """FLOPs of one call, as stated in the module docstring."""
        if self.widths is None:
            fwd = 4 * B * H * T * T * Dv * (0.5 if causal else 1.0)
        else:
            M, P = self.M, len(self.widths)
            features = sum(math.prod(self.widths[: f + 1]) for f in range(1, P))
            fwd = B * H * T * (4 * M * (Dv + 1) + 2 * features)
            if causal:
                fwd += B * H * T * CHUNK * (2 * sum(self.widths) + P - 1 + 2 * (Dv + 1))
        return fwd * (3.5 if mode == "fwdbwd" else 1.0)


@dataclass
class BenchConfig:
    """What ``hla bench`` runs; ``lengths=None`` picks a default for the device."""

    device: str = "cpu"
    lengths: tuple[int, ...] | None = None
    batch: int = 1
    heads: int = 4
    dv: int = 64
    widths: tuple[tuple[int, ...], ...] = ((64,), (16, 16), (8, 8, 8))
    dtype: str = "float32"
    modes: tuple[str, ...] = MODES
    causal: tuple[bool, ...] = (False, True)
    backend: str = "auto"
    repeats: int = 3
    sdpa_fwdbwd_max: int | None = None  # longest N at which SDPA forward+backward is timed (None: all)
    out: str = "bench-out"

    def resolved_lengths(self) -> tuple[int, ...]:
        if self.lengths is not None:
            return tuple(self.lengths)
        return (1024, 2048, 4096, 8192, 16384) if self.device == "cpu" else (4096, 8192, 16384, 32768, 65536)

    def paths(self) -> list[AttnPath]:
        return [AttnPath(), *(AttnPath(tuple(w)) for w in self.widths)]


# the side-by-side measurement of the bars in benchmarks/RESULTS.md
PRESETS = {
    "bar": dict(
        device="cpu",
        lengths=(4096, 16384),
        batch=1,
        heads=4,
        dv=64,
        widths=((16, 16),),
        dtype="float32",
        modes=MODES,
        backend="torch",
        repeats=5,
    ),
}


def make_config(preset: str | None = None, **overrides) -> BenchConfig:
    """A config from a preset's values, then the explicit ``overrides``."""
    return BenchConfig(**{**PRESETS.get(preset, {}), **overrides}) if preset else BenchConfig(**overrides)


@dataclass
class Row:
    """One measurement: a path at one length, causal or not, forward or forward+backward."""

    path: AttnPath
    causal: bool
    mode: str
    T: int
    status: str = "ok"  # "ok", "skipped: <why>" or "refused: <why>"
    ms: float | None = None
    flop: float | None = None
    peak_bytes: int | None = None
    speedup: float | None = None

    @property
    def gflops(self) -> float | None:
        return None if self.ms is None else self.flop / self.ms / 1e6


class PeakMemoryMode(TorchDispatchMode):
    """Peak bytes of the tensor storages that aten ops create while the mode is active (any device).

    A storage is counted from the op that returns it, when none of the op's tensor arguments holds it (views,
    in-place and ``out=`` results are not new memory), until it is freed (a weakref finalizer on the storage).
    Storages that existed before the mode are never counted, nor scratch that a kernel frees before returning.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()  # data_ptr of each counted, still live storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self._count(t.untyped_storage(), known)
        return out

    def _count(self, storage, known: set[int]) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in known or key in self._counted:
            return
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


def peak_memory(fn, device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was allocated before (inputs are not counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakMemoryMode() as mode:
        fn()
    return mode.peak


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()``; the caller has warmed it up (CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    times: list[float] = []
    while len(times) < repeats or (sum(times) < MIN_TIME_S and len(times) < MAX_RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_step(path: AttnPath, xs: list[torch.Tensor], causal: bool, mode: str, backend: str, gen):
    """A closure running one forward (no autograd) or one forward and backward (``torch.autograd.grad``)."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                path.forward(xs, causal, backend)

        return step
    with torch.no_grad():
        o = path.forward(xs, causal, backend)
    do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)

    def step():
        torch.autograd.grad(path.forward(xs, causal, backend), xs, do)

    return step


def check_path(path: AttnPath, causal: bool, cfg: BenchConfig) -> float:
    """Largest relative RMS error of the output and every input gradient against the float64 reference."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    gen = torch.Generator(device).manual_seed(1)
    B, T, H = CHECK_SHAPE
    xs = path.inputs(B, T, H, cfg.dv, dtype, device, True, gen)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    o, ref = path.forward(xs, causal, cfg.backend), path.reference(xs64, causal)
    do = torch.randn(ref.shape, generator=gen, device=device, dtype=torch.float64)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype))
    grads_ref = torch.autograd.grad(ref, xs64, do)
    return max(rel_rms(r, a) for a, r in zip((o, *grads), (ref, *grads_ref)))


def verdict(path: AttnPath, causal: bool, cfg: BenchConfig) -> str:
    """``"ok (rel. error ...)"``, or ``"refused: ..."`` for a path that is wrong or cannot run these inputs."""
    try:
        err = check_path(path, causal, cfg)
    except Exception as e:
        return f"refused: {type(e).__name__}: {e}"
    tol = TOLERANCE[DTYPES[cfg.dtype]]
    if not err <= tol:  # also refuses NaN
        return f"refused: rel. error {err:.1e} > {tol:.0e}"
    return f"ok (rel. error {err:.1e})"


def run(cfg: BenchConfig) -> tuple[list[Row], dict[tuple[str, bool], str]]:
    """Check every path, then measure each (length, path, causal, mode).

    Returns:
        the rows, and the check's verdict per (path name, causal): ``"ok (rel. error 3.0e-07)"`` or
        ``"refused: <why>"``.
    """
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {cfg.backend!r}")
    paths, lengths = cfg.paths(), cfg.resolved_lengths()
    checks = {}
    for path in tqdm(paths, desc="checking against float64", leave=False):
        for causal in cfg.causal:
            checks[path.name, causal] = verdict(path, causal, cfg)

    cases = [(T, p, c, m) for T in lengths for p in paths for c in cfg.causal for m in cfg.modes]
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for T, path, causal, mode in tqdm(cases, desc="hla bench"):
        row = Row(path, causal, mode, T, flop=path.flop(cfg.batch, T, cfg.heads, cfg.dv, causal, mode))
        rows.append(row)
        if checks[path.name, causal].startswith("refused"):
            row.status = checks[path.name, causal]
            continue
        if path.widths is None and mode == "fwdbwd" and cfg.sdpa_fwdbwd_max is not None and T > cfg.sdpa_fwdbwd_max:
            row.status = f"skipped: N > --sdpa-fwdbwd-max {cfg.sdpa_fwdbwd_max}"
            continue
        xs = path.inputs(cfg.batch, T, cfg.heads, cfg.dv, dtype, device, mode == "fwdbwd", gen)
        step = make_step(path, xs, causal, mode, cfg.backend, gen)
        row.peak_bytes = peak_memory(step, device)  # doubles as the warm-up
        row.ms = time_ms(step, device, cfg.repeats)
    sdpa = {(r.causal, r.mode, r.T): r.ms for r in rows if r.path.widths is None}
    for r in rows:
        base = sdpa.get((r.causal, r.mode, r.T))
        r.speedup = None if base is None or r.ms is None else base / r.ms
    return rows, checks


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    """One line per row, grouped by mode, causality and length."""
    head = (
        f"{'mode':<7}{'causal':<8}{'N':>7}  {'path':<14}{'M':>6}{'ms':>11}{'x SDPA':>9}{'GFLOP/s':>9}{'peak MiB':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (MODES.index(r.mode), r.causal, r.T)):
        mib = None if r.peak_bytes is None else r.peak_bytes / 2**20
        line = (
            f"{r.mode:<7}{str(r.causal):<8}{r.T:>7}  {r.path.name:<14}{_fmt(r.path.M, 'd'):>6}{_fmt(r.ms, '.2f'):>11}"
            f"{_fmt(r.speedup, '.2f'):>9}{_fmt(r.gflops, '.1f'):>9}{_fmt(mib, '.1f'):>10}"
        )
        lines.append(line if r.status == "ok" else f"{line}  {r.status}")
    return "\n".join(lines)


def io_bytes_per_token(path: AttnPath, cfg: BenchConfig) -> int:
    """Bytes per token of what forward+backward must return: the output and the gradient of every input."""
    qk = 2 * sum(path.widths) if path.widths else 2 * cfg.dv  # q and k (all factors)
    return cfg.batch * cfg.heads * (qk + 2 * cfg.dv) * DTYPES[cfg.dtype].itemsize


def format_memory(rows: list[Row], cfg: BenchConfig) -> str:
    """Forward+backward peak memory at the two longest lengths measured, as bytes per token, next to what the
    call must return (output and input gradients) and to what one fp32 ``[T, M]`` tensor per head would add."""
    lines = [
        "forward+backward peak memory growth between the two longest lengths (bytes per token):",
        f"{'path':<14}{'causal':<8}{'N1':>7}{'MiB':>9}{'N2':>7}{'MiB':>9}{'growth':>9}{'o+grads':>9}{'[T,M]':>8}",
    ]
    for path in cfg.paths():
        for causal in cfg.causal:
            ok = sorted(
                (r for r in rows if r.path == path and r.causal == causal and r.mode == "fwdbwd" and r.ms),
                key=lambda r: r.T,
            )[-2:]
            if len(ok) < 2:
                continue
            a, b = ok
            growth = (b.peak_bytes - a.peak_bytes) / (b.T - a.T)
            tm = "-" if path.M is None else str(cfg.batch * cfg.heads * path.M * 4)
            mib_a, mib_b = a.peak_bytes / 2**20, b.peak_bytes / 2**20
            lines.append(
                f"{path.name:<14}{str(causal):<8}{a.T:>7}{mib_a:>9.1f}{b.T:>7}{mib_b:>9.1f}"
                f"{growth:>9.0f}{io_bytes_per_token(path, cfg):>9}{tm:>8}"
            )
    return "\n".join(lines)


CSV_FIELDS = (
    "device",
    "dtype",
    "backend",
    "batch",
    "heads",
    "dv",
    "path",
    "widths",
    "M",
    "causal",
    "mode",
    "N",
    "ms",
    "speedup_vs_sdpa",
    "gflop",
    "gflop_per_s",
    "peak_bytes",
    "status",
    "check",
)


def write_csv(rows: list[Row], checks: dict, cfg: BenchConfig, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow(
                (
                    cfg.device,
                    cfg.dtype,
                    cfg.backend,
                    cfg.batch,
                    cfg.heads,
                    cfg.dv,
                    r.path.name,
                    "" if r.path.widths is None else "x".join(map(str, r.path.widths)),
                    _fmt(r.path.M, "d"),
                    r.causal,
                    r.mode,
                    r.T,
                    _fmt(r.ms, ".4f"),
                    _fmt(r.speedup, ".3f"),
                    f"{r.flop / 1e9:.4f}",
                    _fmt(r.gflops, ".2f"),
                    _fmt(r.peak_bytes, "d"),
                    r.status,
                    checks[r.path.name, r.causal],
                )
            )


def plot(rows: list[Row], cfg: BenchConfig, path: Path) -> None:
    """Log-log time against N, one panel per (mode, causal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, c) for m in cfg.modes for c in cfg.causal]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (mode, causal) in zip(axes[0], panels):
        for p in cfg.paths():
            pts = [(r.T, r.ms) for r in rows if r.path == p and r.mode == mode and r.causal == causal and r.ms]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p.name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="N (tokens)",
            ylabel="ms",
            title=f"{'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}, {'causal' if causal else 'non-causal'}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg.device} {cfg.dtype}, B={cfg.batch} H={cfg.heads} Dv={cfg.dv}, backend {cfg.backend}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def header(cfg: BenchConfig) -> str:
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else platform.processor()
    threads = f", {torch.get_num_threads()} threads" if cfg.device == "cpu" else ""
    return (
        f"hla bench on {cfg.device} ({device or platform.machine()}{threads}), torch {torch.__version__}, "
        f"{cfg.dtype}, B={cfg.batch} H={cfg.heads} Dv={cfg.dv}, backend {cfg.backend}"
    )


def bench(cfg: BenchConfig) -> int:
    """Run, print the table, write ``bench.csv`` and ``bench.png`` into ``cfg.out``.

    Returns:
        the exit status: 1 if a path was refused by the correctness check, else 0.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, checks = run(cfg)
    print(header(cfg))
    print("correctness against float64 (output and input gradients):")
    for (name, causal), verdict in checks.items():
        print(f"  {name:<14}{'causal' if causal else 'non-causal':<12}{verdict}")
    print()
    print(format_table(rows))
    print()
    print(format_memory(rows, cfg))
    write_csv(rows, checks, cfg, out / "bench.csv")
    plot(rows, cfg, out / "bench.png")
    print(f"\nwrote {out / 'bench.csv'} and {out / 'bench.png'}")
    return 1 if any(v.startswith("refused") for v in checks.values()) else 0
