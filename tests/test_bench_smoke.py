"""The benchmark harness (bench/) on a CPU: the report and MFU arithmetic directly, and each section
of `python -m bench --quick` in a subprocess, asserting that its rows exist, carry numbers and
that every correctness check it ran passed (the checks compare fast paths against reference
paths: attention backends, grouped GEMMs, chunked loss, cached decoding, torch vs JAX)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mfu import decode_flops_per_token, mfu, train_flops_per_token
from bench.report import Results, Row
from blues.config import BluesConfig

REPO = Path(__file__).resolve().parent.parent


def run_bench(tmp_path, *args, timeout=600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    path = out / "bench_results.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return proc, rows


def assert_rows_ok(proc, rows, expected: set[tuple[str, str]]):
    detail = f"\nstdout tail:\n{proc.stdout[-3000:]}\nstderr tail:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}" + detail
    have = {(r["framework"], r["workload"]) for r in rows}
    assert expected <= have, f"missing rows {expected - have}" + detail
    for r in rows:
        assert not r["error"], f"{r['framework']} {r['workload']}: {r['error']}" + detail
        assert r["check_ok"] is not False, f"{r['framework']} {r['workload']} {r['variant']}: {r['check']}" + detail
        if r["workload"] != "parity bf16" and not r["skipped"]:
            rate = r["tokens_per_s"] or r["tflops"]
            assert rate and rate > 0 and math.isfinite(rate), r
    checked = [r for r in rows if r["check_ok"] is not None]
    assert checked, "no correctness check ran" + detail
    assert "| framework | workload |" in proc.stdout  # the table was printed


# ---- no subprocess: the arithmetic and the report ---------------------------------------------------

def test_mfu_formula_reproduces_the_issue_peer_number():
    # Issue 8: the peer at the bench preset, 8 x 2048, 44.0k tokens/s -> 18.7% MFU of 795 TFLOP/s.
    cfg = BluesConfig.preset("bench")
    per_token = train_flops_per_token(cfg, 2048)
    expected = 6 * cfg.num_active_matmul_parameters() + 6 * 12 * 16 * 64 * 2048
    assert per_token == expected
    assert mfu(44.0e3, per_token, 795.0) == pytest.approx(0.187, abs=0.001)
    # decoding counts the forward only: a third of the matmul term
    assert decode_flops_per_token(cfg, 32, 256) < per_token / 2
    assert mfu(None, per_token, 795.0) is None and mfu(1.0, per_token, None) is None


def test_report_rows_table_vs_peer_and_merge(tmp_path):
    res = Results(tmp_path / "a", argv=["--test"])
    res.set_dense("torch", 800.0)
    res.add(Row(framework="peer", workload="train bench", variant="hf mixtral", tokens_per_s=40e3,
                flops_per_token=3.38e9, dense_framework="torch", peak_gib=60.0, check="c", check_ok=True))
    res.add(Row(framework="torch", workload="train bench", variant="eager", error="boom"))
    res.add(Row(framework="torch", workload="train bench", variant="(error)", error="RuntimeError: x"))
    res.add(Row(framework="torch", workload="train bench", variant="eager", tokens_per_s=100e3,
                flops_per_token=3.38e9, dense_framework="torch", peak_gib=30.0, check="attn ok", check_ok=True))
    rows = Results(tmp_path / "a").rows  # re-read from disk: every add was written
    assert {(r.framework, r.variant) for r in rows} == {("peer", "hf mixtral"), ("torch", "eager")}
    table = res.table()
    line = next(l for l in table.splitlines() if l.startswith("| torch | train bench"))
    assert "2.50x tok/s, 0.50x mem" in line
    assert f"| {100e3 * 3.38e9 / 800e12:.1%} |" in line  # MFU measured: over the 800 TFLOP/s this run measured
    assert "| framework | workload | variant | tokens/s | MFU spec | MFU measured |" in table
    cells = [c.strip() for c in line.split("|")]
    assert cells[5] == "" and cells[6] == f"{100e3 * 3.38e9 / 800e12:.1%}"  # no datasheet rate for a CPU
    res.data["meta"]["gpu"] = "NVIDIA H200"
    table = res.table()
    line = next(l for l in table.splitlines() if l.startswith("| torch | train bench"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[5:7] == [f"{100e3 * 3.38e9 / 989e12:.1%}", f"{100e3 * 3.38e9 / 800e12:.1%}"]  # spec, measured
    assert "datasheet 989 TFLOP/s" in table
    assert "correctness checks: 2/2 passed" in table
    assert "not run:" in table and "jax / train bench" in table
    compact = res.table(compact=True)
    assert "| pass |" in compact and "attn ok" not in compact
    # DeepSpeed is held to plain PyTorch like for like: eager engine vs eager, compiled engine vs compiled
    res.add(Row(framework="torch", workload="train bench", variant="compile", tokens_per_s=200e3))
    res.add(Row(framework="torch+deepspeed", workload="train bench", variant="zero2", tokens_per_s=95e3))
    res.add(Row(framework="torch+deepspeed", workload="train bench", variant="zero2-compile", tokens_per_s=150e3))
    table = res.table()
    assert "train bench deepspeed zero2-compile / torch compile tokens/s 0.750 (>= 0.95: MISSED)" in table
    assert "0.75x torch compile" in next(l for l in table.splitlines() if "| zero2-compile |" in l)

    other = Results(tmp_path / "b", argv=["--test"])
    other.add(Row(framework="jax", workload="train bench", variant="jit", tokens_per_s=90e3, check="bad", check_ok=False))
    res.merge(other)
    merged = Results(tmp_path / "a").table()
    assert "FAILED: jax train bench jit" in merged


# ---- python -m bench --quick, section by section --------------------------------------------------------

def test_cli_rejects_unknown_section(tmp_path):
    proc, _ = run_bench(tmp_path, "--what", "nonsense", timeout=120)
    assert proc.returncode == 2
    assert "unknown section(s) nonsense" in proc.stderr


@pytest.mark.slow
def test_quick_torch_train_loss_gemm(tmp_path):
    proc, rows = run_bench(tmp_path, "--what", "train,loss,gemm", "--framework", "torch")
    assert_rows_ok(proc, rows, {("torch", "train tiny"), ("torch", "loss chunked"), ("torch", "loss plain"),
                                ("torch", "grouped gemm")})
    # the train row ran both fast-vs-reference checks and the learning check
    train = next(r for r in rows if r["workload"] == "train tiny")
    assert "vs reference" in train["check"] and "model vs float32" in train["check"] and "->" in train["check"]


@pytest.mark.slow
def test_quick_jax_train_loss_gemm(tmp_path):
    proc, rows = run_bench(tmp_path, "--what", "train,trainer,loss,gemm", "--framework", "jax")
    assert_rows_ok(proc, rows, {("jax", "train tiny"), ("jax", "loss chunked"), ("jax", "loss plain"),
                                ("jax", "grouped gemm")})
    # the bench's step and the trainer's own run, side by side; the trainer's figure is its metrics' median
    variants = {r["variant"] for r in rows if r["workload"] == "train tiny"}
    assert {"jit", "trainer jit"} <= variants, variants
    trainer = next(r for r in rows if r["variant"] == "trainer jit")
    assert "train_jax.py" in trainer["notes"]
    assert (tmp_path / "bench" / "trainer" / "jax-tiny-jit-quick" / "metrics.jsonl").is_file()
    loss = [r for r in rows if r["workload"] == "loss chunked"]
    assert all(r["peak_gib"] is not None for r in loss)  # XLA's plan is available on a CPU too
    train = next(r for r in rows if r["workload"] == "train tiny")
    assert "vs reference" in train["check"] and "model vs float32" in train["check"] and "->" in train["check"]


@pytest.mark.slow
def test_quick_decode_both_frameworks(tmp_path):
    proc, rows = run_bench(tmp_path, "--what", "decode")
    assert_rows_ok(proc, rows, {(fw, f"decode b{b}") for fw in ("torch", "jax") for b in (1, 64)})
    assert all("full-forward argmax" in r["check"] for r in rows)


@pytest.mark.slow
def test_quick_peer_deepspeed_parity(tmp_path):
    pytest.importorskip("transformers")
    proc, rows = run_bench(tmp_path, "--what", "peer,deepspeed,parity")
    expected = {("peer", "train tiny"), ("peer", "decode b1"), ("peer", "decode b64"),
                ("torch+deepspeed", "train tiny"), ("torch vs jax", "parity bf16")}
    assert_rows_ok(proc, rows, expected)
    ds = next(r for r in rows if r["framework"] == "torch+deepspeed")
    assert ds["skipped"] or ds["check_ok"]


def test_data_bench_reports_the_fastest_of_repeated_runs(capsys):
    """`python -m bench --what data --repeat N`: each worker count's fastest run is its row (the run
    least disturbed on a shared machine), with the number of runs and the slowest, and the speed-up
    is fastest against fastest."""
    from bench.data import print_table

    def row(workers, seconds):
        return {"what": "tokenize", "corpus_gb": 0.36, "workers": workers, "seconds": seconds, "wall": seconds + 1,
                "tokens": 100, "tokens_per_s": 100 / seconds, "per_worker": 100 / seconds / workers,
                "peak_rss_gib": 0.5, "rss_x_file": 1.5}

    print_table([row(1, 30.0), row(2, 20.0), row(1, 25.0), row(2, 21.0), row(1, 28.0), row(2, 16.0)], cpus=2)
    out = capsys.readouterr().out
    assert "| tokenize | 0.36 GB | 1 | 25.0 (26.0, 3 runs up to 30.0) |" in out
    assert "| tokenize | 0.36 GB | 2 | 16.0 (17.0, 3 runs up to 21.0) |" in out
    assert "speed-up 1 -> 2 workers: 1.56x" in out
