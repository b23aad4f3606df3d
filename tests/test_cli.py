"""``hla bench`` end to end on a tiny configuration."""

import csv

import pytest
import torch

from hadamard_attn import bench
from hadamard_attn.cli import main

TINY = ["bench", "--lengths", "64", "128", "--heads", "2", "--dv", "8", "--widths", "4", "2,2", "--repeats", "1"]


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_bench_end_to_end(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "x SDPA" in out and "peak MiB" in out and "HLA 2x2" in out and "linear 4" in out
    assert "refused" not in out and out.count("ok (rel. error") == 6  # 3 paths x causal / non-causal
    rows = read_csv(tmp_path / "bench.csv")
    # 2 lengths x 3 paths x 2 causal x 2 modes, every one timed, with its memory
    assert len(rows) == 24
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and int(r["peak_bytes"]) > 0 for r in rows)
    assert {r["path"] for r in rows} == {"sdpa", "linear 4", "HLA 2x2"}
    assert all(float(r["speedup_vs_sdpa"]) == 1.0 for r in rows if r["path"] == "sdpa")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_refuses_a_wrong_path(tmp_path, capsys, monkeypatch):
    """A path whose output is 1 % off must not be timed, and the command must fail."""
    hadamard_attn = bench.hadamard_attn

    def off_by_one_percent(q, k, v, **kwargs):
        o, state = hadamard_attn(q, k, v, **kwargs)
        return (o if kwargs["backend"] == "naive" else o * 1.01), state

    monkeypatch.setattr(bench, "hadamard_attn", off_by_one_percent)
    assert main([*TINY, "--widths", "2,2", "--causal", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "refused: rel. error 1.0e-02" in out
    rows = read_csv(tmp_path / "bench.csv")
    assert {r["causal"] for r in rows} == {"True"}
    hla = [r for r in rows if r["path"] == "HLA 2x2"]
    assert len(hla) == 4 and all(r["status"].startswith("refused") and r["ms"] == "-" for r in hla)
    assert all(r["status"] == "ok" for r in rows if r["path"] == "sdpa")


def test_bench_skips_long_sdpa_backward(tmp_path, capsys):
    args = [*TINY, "--widths", "4", "--modes", "fwdbwd", "--noncausal", "--sdpa-fwdbwd-max", "64"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = {(r["path"], r["N"]): r for r in read_csv(tmp_path / "bench.csv")}
    assert rows["sdpa", "64"]["status"] == "ok" and rows["sdpa", "128"]["status"].startswith("skipped")
    assert rows["linear 4", "128"]["status"] == "ok" and rows["linear 4", "128"]["speedup_vs_sdpa"] == "-"
    assert "skipped: N > --sdpa-fwdbwd-max 64" in capsys.readouterr().out


def test_bench_preset_and_bad_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "bench", lambda cfg: seen.append(cfg) or 0)
    assert main(["bench", "--preset", "bar", "--lengths", "256"]) == 0
    assert seen[0].lengths == (256,) and seen[0].widths == ((16, 16),) and seen[0].backend == "torch"
    assert seen[0].causal == (False, True)
    for bad in (["bench", "--widths", "16,x"], ["bench", "--widths", "0"], ["bench", "--modes", "bwd"], []):
        with pytest.raises(SystemExit):
            main(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda(tmp_path):
    assert main([*TINY, "--device", "cuda", "--out", str(tmp_path)]) == 0
