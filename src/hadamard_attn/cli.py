"""The ``hla`` command. ``hla bench``: see :mod:`hadamard_attn.bench`."""

from __future__ import annotations

import argparse

from . import bench

SUPPRESS = argparse.SUPPRESS  # options left out keep the preset's value, else the BenchConfig default


def widths(text: str) -> tuple[int, ...]:
    """``"16,16" -> (16, 16)``."""
    try:
        out = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated factor widths such as 16,16, got {text!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"factor widths must be >= 1, got {text!r}")
    return out


def add_bench(sub) -> None:
    d = bench.BenchConfig()
    p = sub.add_parser(
        "bench",
        help="time SDPA, linear attention and HLA over sequence lengths",
        description="Time softmax attention (SDPA), P = 1 linear attention and HLA over sequence lengths, causal and "
        "non-causal, forward and forward+backward, after checking each path against a float64 reference. Prints a "
        "table (ms, speedup vs SDPA, GFLOP/s, peak memory) and writes bench.csv and bench.png into --out.",
    )
    p.add_argument("--preset", choices=sorted(bench.PRESETS), help="start from a preset (bar: the bars of RESULTS.md)")
    p.add_argument("--device", default=SUPPRESS, help=f"cpu or cuda[:i] (default {d.device})")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=SUPPRESS,
        metavar="N",
        help="sequence lengths (default 1024..16384 on CPU, 4096..65536 on CUDA)",
    )
    p.add_argument("--batch", type=int, default=SUPPRESS, help=f"B (default {d.batch})")
    p.add_argument("--heads", type=int, default=SUPPRESS, help=f"H (default {d.heads})")
    p.add_argument("--dv", type=int, default=SUPPRESS, help=f"value (and SDPA head) dim (default {d.dv})")
    p.add_argument(
        "--widths",
        type=widths,
        nargs="+",
        default=SUPPRESS,
        metavar="R1[,R2,...]",
        help="one linear/HLA path per argument, P = number of widths (default 64 16,16 8,8,8)",
    )
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default=SUPPRESS, help=f"(default {d.dtype})")
    p.add_argument("--modes", choices=bench.MODES, nargs="+", default=SUPPRESS, help="(default fwd fwdbwd)")
    p.add_argument("--causal", action="store_true", default=SUPPRESS, help="causal only (default: both)")
    p.add_argument("--noncausal", action="store_true", default=SUPPRESS, help="non-causal only (default: both)")
    p.add_argument(
        "--backend",
        choices=bench.BACKENDS,
        default=SUPPRESS,
        help="HLA backend: auto, torch (parallel / chunk) or triton (default auto)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=SUPPRESS,
        help=f"CPU: timed runs at least, median (default {d.repeats}); CUDA: do_bench decides",
    )
    p.add_argument(
        "--sdpa-fwdbwd-max",
        type=int,
        default=SUPPRESS,
        metavar="N",
        help="skip SDPA forward+backward above this length (default: none)",
    )
    p.add_argument("--out", default=SUPPRESS, help=f"output folder (default {d.out})")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("command", "func", "preset", "causal", "noncausal")}
    for key in ("lengths", "widths", "modes"):
        if key in opts:
            opts[key] = tuple(opts[key])
    only_causal, only_noncausal = "causal" in vars(args), "noncausal" in vars(args)
    if only_causal != only_noncausal:
        opts["causal"] = (only_causal,)
    return bench.bench(bench.make_config(args.preset, **opts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hla", description="Hadamard Linear Attention tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench(sub)
    args = parser.parse_args(argv)
    return args.func(args)
