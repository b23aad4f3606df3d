"""The benchmark's own instruments: the CPU peak-memory tracker, FLOP counts, timing, the correctness gate."""

import math

import pytest
import torch

from hadamard_attn import bench
from hadamard_attn.bench import AttnPath, BenchConfig, PeakMemoryMode

F32 = 4  # bytes


def test_peak_memory_mode_known_pattern():
    x0 = torch.ones(4096)  # exists before: never counted
    with PeakMemoryMode() as mode:
        a = torch.ones(1000)  # +4000
        b = torch.empty(2000)  # +8000 -> 12000
        view = a.view(10, 100)  # a view: no new memory
        b.add_(1)  # in place: no new memory
        y = x0 * 2  # +16384 -> 28384 (peak)
        x0.mul_(1.0)
        del a, y  # the view keeps a's storage alive: -16384 -> 12000
        assert mode.live == 12000
        del view  # -4000 -> 8000
        c = torch.zeros(500)  # +2000 -> 10000
        assert mode.live == 10000
    assert mode.peak == 12000 + 16384
    del b, c
    assert mode.live == 0


def test_peak_memory_mode_counts_backward():
    w = torch.randn(256, 128, requires_grad=True)
    x = torch.randn(64, 256)
    with PeakMemoryMode() as mode:
        y = x @ w  # [64, 128]
        (y * y).sum().backward()  # dy [64, 128] is alive while w.grad = x^T dy [256, 128] is made
    assert mode.live == (64 * 128 + 256 * 128) * F32  # y and w.grad are left
    assert mode.peak >= mode.live + 64 * 128 * F32


def test_peak_memory_cpu_temporaries():
    def fn():
        t = torch.empty(1 << 20)  # 4 MiB, freed before the next one
        del t
        s = torch.empty(1 << 19)  # 2 MiB
        return s.sum()

    assert bench.peak_memory(fn, torch.device("cpu")) == (1 << 20) * F32


@pytest.mark.parametrize("causal", [False, True])
def test_fwdbwd_memory_has_no_TM_term(causal):
    """Over lengths of several tiles, forward+backward memory of the torch paths grows by the output and input
    gradients per token, plus at most one [T, Dv + 1] fp32 buffer, far below one [T, M] fp32 tensor."""
    B, H, Dv = 1, 1, 16
    cfg = BenchConfig(batch=B, heads=H, dv=Dv, backend="torch")
    path = AttnPath((32, 32))  # M = 1024
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for T in (4096, 8192):  # two and four blocks of the chunked path
        xs = path.inputs(B, T, H, Dv, torch.float32, torch.device("cpu"), True, gen)
        step = bench.make_step(path, xs, causal, "fwdbwd", "torch", gen)
        peaks.append(bench.peak_memory(step, torch.device("cpu")))
    growth = (peaks[1] - peaks[0]) / 4096  # bytes per token
    io = bench.io_bytes_per_token(path, cfg)
    assert io <= growth <= io + B * H * (Dv + 1) * F32
    assert growth < B * H * path.M * F32 / 4


def test_flop_counts():
    sdpa = AttnPath()
    assert sdpa.flop(2, 100, 3, 8, False, "fwd") == 4 * 2 * 3 * 100**2 * 8
    assert sdpa.flop(2, 100, 3, 8, True, "fwd") == 2 * 2 * 3 * 100**2 * 8
    assert sdpa.flop(2, 100, 3, 8, True, "fwdbwd") == 3.5 * 2 * 2 * 3 * 100**2 * 8
    hla = AttnPath((2, 3, 4))  # M = 24, Khatri-Rao products per token and side: 6 + 24
    assert hla.flop(1, 10, 1, 5, False, "fwd") == 10 * (4 * 24 * 6 + 2 * 30)
    intra = 10 * bench.CHUNK * (2 * 9 + 2 + 2 * 6)
    assert hla.flop(1, 10, 1, 5, True, "fwd") == 10 * (4 * 24 * 6 + 2 * 30) + intra


def test_time_ms_runs_at_least_repeats():
    calls = []
    ms = bench.time_ms(lambda: calls.append(1), torch.device("cpu"), repeats=3)
    assert len(calls) >= 3 and 0 <= ms < 10


@pytest.mark.parametrize("widths", [None, (4,), (3, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_check_path_passes_correct_paths(widths, causal):
    assert bench.check_path(AttnPath(widths), causal, BenchConfig(dv=8)) < 1e-5


@pytest.mark.parametrize("widths", [None, (3, 2)])
def test_check_path_catches_wrong_gradient(widths, monkeypatch):
    """A path whose forward is right but whose backward is wrong must fail the check."""
    forward = AttnPath.forward

    def wrong_backward(self, xs, causal, backend):
        o = forward(self, xs, causal, backend)
        if backend == "naive" or o.dtype == torch.float64:
            return o
        return o + 0.1 * (o - o.detach())  # same values, gradients 10 % too large

    monkeypatch.setattr(AttnPath, "forward", wrong_backward)
    err = bench.check_path(AttnPath(widths), False, BenchConfig(dv=8))
    assert err == pytest.approx(0.1, rel=0.01)


def test_make_config_preset_then_overrides():
    cfg = bench.make_config("bar", repeats=1)
    assert cfg.widths == ((16, 16),) and cfg.lengths[-1] == 16384 and cfg.heads == 4 and cfg.repeats == 1
    assert bench.make_config(None).resolved_lengths() == BenchConfig().resolved_lengths()
    assert math.prod(AttnPath((64, 4)).widths) == AttnPath((64, 4)).M == 256


@pytest.mark.parametrize(("err", "expected"), [(1e-7, "ok"), (1.0, "refused: rel. error"), (math.nan, "refused")])
def test_verdict(err, expected, monkeypatch):
    monkeypatch.setattr(bench, "check_path", lambda path, causal, cfg: err)
    assert bench.verdict(AttnPath(), False, BenchConfig()).startswith(expected)


def test_verdict_refuses_a_path_that_raises():
    cfg = BenchConfig(dv=8, widths=((4,),), backend="bogus")
    assert bench.verdict(AttnPath((4,)), False, cfg).startswith("refused: ValueError: backend")


def test_host_time_script_runs():
    """``benchmarks/host_time.py`` (host time per call with the launches stubbed) runs on a machine without a GPU
    and times every path it names."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "host_time.py")], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.endswith(" us")]
    assert len(lines) == 8 and all(float(line.split()[-2]) > 0 for line in lines), out.stdout


def test_lm_gpu_script_runs_on_cpu():
    """``benchmarks/lm_gpu.py`` (the transformers integration's GPU check) runs end to end on the CPU at a small
    size (with ``--first-config``): its three checks pass and it prints the generation time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    args = ["--device", "cpu", "--prefill", "40", "--decode", "3", "--pad", "7", "--generate", "4", "--first-config"]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "lm_gpu.py"), *args], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "checks PASSED" in out.stdout and out.stdout.count("  ok ") == 3 and "ms/token" in out.stdout
