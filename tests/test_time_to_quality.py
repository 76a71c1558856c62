"""Time to quality (bench/time_to_quality.py, bench/quality_peers.py) on a CPU: the timing of rows
against stand-in processes that write metrics.jsonl records on a known schedule (seconds), the
table's ratios and verdicts, the rows' commands against the README's tiny recipe, bad input, and
(slow) `--quick` with Blues' PyTorch trainer and the transformers peer for real."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import time_to_quality as ttq

REPO = Path(__file__).resolve().parent.parent


def fake_row(script: str) -> list[str]:
    """A stand-in row: python -c SCRIPT OUT_DIR, SCRIPT writing records with `ev(step, ppl)` / `tr(step)`."""
    prelude = textwrap.dedent("""
        import json, signal, sys, time
        from pathlib import Path
        out = Path(sys.argv[1]); f = open(out / "metrics.jsonl", "a")
        def write(rec): f.write(json.dumps(rec) + "\\n"); f.flush()
        def ev(step, ppl): write({"step": step, "val_loss": 0.0, "val_perplexity": ppl, "experts": []})
        def tr(step, tps=1000.0): write({"step": step, "loss": 1.0, "tokens_per_s": tps})
    """)
    return [sys.executable, "-c", prelude + textwrap.dedent(script)]


def run(tmp_path, script, **kw):
    row_dir = tmp_path / "row"
    cmd = fake_row(script) + [str(row_dir)]
    kw.setdefault("limit_s", 60)
    kw.setdefault("target", 400.0)
    result = ttq.run_row(cmd, row_dir, poll_s=0.02, **kw)
    return ttq.summarize(result, kw["target"], row_dir / "metrics.jsonl")


def test_the_first_evaluation_at_the_target_is_timed_from_the_process_start(tmp_path):
    r = run(tmp_path, """
        tr(1); ev(2, 900.0)
        time.sleep(0.8); tr(3, 2000.0); ev(4, 350.0)
        time.sleep(0.3); ev(6, 380.0); ev(8, 310.0)
    """)
    assert r["status"] == "ok" and r["stopped"] is None
    assert [e["step"] for e in r["evals"]] == [2, 4, 6, 8]
    # step 4's record was written at least 0.8 s after the start, step 6's 0.3 s after it
    assert r["steps"] == 4 and 0.8 <= r["time_s"] < r["evals"][2]["seconds"] <= r["wall_s"]
    assert (r["best_ppl"], r["best_step"], r["last_step"]) == (310.0, 8, 3)
    assert r["tokens_per_s"] == 1500.0  # the median; the run is shorter than the warm-up, so every step counts


def test_stop_at_target_ends_the_row_and_a_row_that_never_gets_there_is_killed_at_its_limit(tmp_path):
    r = run(tmp_path, "ev(2, 390.0); time.sleep(60)", stop_at_target=True)
    assert r["stopped"] == "target" and r["status"] == "ok" and r["wall_s"] < 30
    assert r["time_s"] is not None and r["steps"] == 2
    # SIGTERM ignored: SIGKILL follows; the row is "not reached", not an error
    r = run(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); ev(2, 900.0); time.sleep(60)",
            limit_s=0.3, grace_s=0.3, kill_after_s=0.3)
    assert r["stopped"] == "time limit" and r["status"] == "ok" and r["wall_s"] < 30
    assert r["time_s"] is None and r["best_ppl"] == 900.0


def test_a_failing_row_is_an_error_with_its_last_line_and_a_peer_without_its_package_is_skipped(tmp_path):
    r = run(tmp_path, "ev(2, 900.0); print('train_torch.py: error: out of memory', file=sys.stderr); sys.exit(1)")
    assert r["status"] == "error" and r["message"] == "exit 1: train_torch.py: error: out of memory"
    r = run(tmp_path, "(out / 'skipped.txt').write_text('torchtitan is not importable')")
    assert r["status"] == "skipped" and r["message"] == "torchtitan is not importable"


def row(name, time_s, best, status="ok", wall=100.0, last=1200):
    return {"row": name, "status": status, "message": "", "time_s": time_s, "steps": 300 if time_s else None,
            "best_ppl": best, "best_step": 900, "tokens_per_s": 5e5, "evals": [{}], "wall_s": wall,
            "stopped": None, "last_step": last}


def test_table_ratio_to_the_fastest_peer_and_the_target():
    meta = {"date": "d", "gpu": "g", "versions": {}}
    rows = [row("torch", 20.0, 310.0), row("jax", 40.0, 305.0), row("hf", 80.0, 330.0), row("titan", 64.0, 390.0)]
    table = ttq.format_table(rows, target=400.0, recipe=ttq.Recipe(), meta=meta)
    lines = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in table.splitlines()
             if l.startswith("| ") and "---" not in l}
    assert lines[ttq.ROW_NAMES["torch"]] == ["20.0", "300", "310.0 (900)", "500,000", "3.20x"]  # 64 / 20
    assert lines[ttq.ROW_NAMES["jax"]][-1] == "1.60x" and lines[ttq.ROW_NAMES["titan"]][-1] == "1.00x"
    assert "Fastest peer: " + ttq.ROW_NAMES["titan"] in table
    assert f"{ttq.ROW_NAMES['torch']}: 3.20x the fastest peer's speed (>= 3x: met)" in table
    assert f"{ttq.ROW_NAMES['jax']}: 1.60x the fastest peer's speed (>= 3x: MISSED)" in table
    # no peer reached the target: the ratio is a lower bound over the shortest peer run
    rows = [row("torch", 20.0, 310.0), row("jax", None, 420.5, last=800), row("hf", None, 450.0, wall=90.0),
            {**row("titan", None, None, status="skipped"), "message": "torchtitan is not importable"}]
    table = ttq.format_table(rows, target=400.0, recipe=ttq.Recipe(), meta=meta)
    assert "| > 4.50x |" in table and "(>= 3x: met)" in table
    assert f"| {ttq.ROW_NAMES['jax']} | not reached (best 420.5) |" in table
    assert f"{ttq.ROW_NAMES['jax']}: target not reached" in table
    assert f"{ttq.ROW_NAMES['jax']}: stopped by its time limit after step 800 of 1,200" in table
    assert f"| {ttq.ROW_NAMES['titan']} | skipped: torchtitan is not importable |" in table


def test_an_eager_peer_row_can_be_the_fastest_peer():
    meta = {"date": "d", "gpu": "g", "versions": {}}
    rows = [row("torch-eager", 20.0, 310.0), row("torch", 70.0, 300.0), row("hf", 90.0, 330.0),
            row("hf-eager", 40.0, 330.0), row("titan", 64.0, 390.0)]
    table = ttq.format_table(rows, target=400.0, recipe=ttq.Recipe(), meta=meta)
    assert "Fastest peer: " + ttq.ROW_NAMES["hf-eager"] in table
    assert f"{ttq.ROW_NAMES['torch-eager']}: 2.00x the fastest peer's speed (>= 3x: MISSED)" in table
    assert f"{ttq.ROW_NAMES['torch']}: 0.57x" in table


def readme_tiny_recipe() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    start = text.index("python train_jax.py --preset tiny --precision bf16")
    command = text[start:text.index("--out_dir", start)].replace("\\\n", " ")
    return flag_values(shlex.split(command)[2:])


def flag_values(argv: list[str]) -> dict[str, str]:
    out, i = {}, 0
    while i < len(argv):
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        out[argv[i]] = argv[i + 1] if has_value else ""
        i += 2 if has_value else 1
    return out


def test_every_row_runs_the_readme_tiny_recipe(tmp_path):
    readme = readme_tiny_recipe()
    assert readme.pop("--save_best") == "" and readme.pop("--max_minutes")  # what the rows change (docstring)
    recipe = flag_values(ttq.Recipe().flags())
    assert recipe.pop("--save_every") == "1200" and recipe.pop("--keep_checkpoints") == "1"
    assert {k: json.loads(v) if k == "--config" else float(v) if v[0].isdigit() else v for k, v in recipe.items()} \
        == {k: json.loads(v) if k == "--config" else float(v) if v[0].isdigit() else v for k, v in readme.items()}
    flags = ttq.Recipe().flags()
    for name in ttq.ROWS:
        cmd = ttq.row_command(name, ttq.Recipe(), tmp_path / name, max_minutes=1.5, compile=True)
        assert cmd[-4 - len(flags):-4] == flags
        assert cmd[-4:] == ["--max_minutes", "1.5", "--out_dir", str(tmp_path / name)]
        assert ("--compile" in cmd) == (name != "jax" and "-eager" not in name)
        assert ("--cuda_graph" in cmd) == name.endswith("-graph")
        plain = ttq.row_command(name.removesuffix("-graph").removesuffix("-eager"), ttq.Recipe(), tmp_path / name,
                                max_minutes=1.5, compile=False)
        assert [c for c in cmd if c not in ("--compile", "--cuda_graph")] == plain  # the same program and flags
    assert ttq.row_command("titan", ttq.Recipe(), tmp_path, max_minutes=1, compile=False)[1:5] == \
        ["-m", "bench.quality_peers", "--peer", "titan"]
    env = ttq.row_env(tmp_path)
    for cache in ("JAX_COMPILATION_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[cache].startswith(str(tmp_path))
    assert "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", "")  # conftest forces 8 devices


@pytest.mark.parametrize("argv, message", [
    (["-m", "bench", "--what", "quality", "--rows", "torch,nope"], "--rows: unknown row(s) nope; choose from"),
    (["-m", "bench", "--what", "quality", "--max-minutes", "0"], "--max-minutes must be positive"),
    (["-m", "bench.quality_peers", "--peer", "hf", "--save_best"], "--save_best is not available for a peer run"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, *argv, "--out" if "bench" == argv[1] else "--out_dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("python -m bench"), proc.stderr


@pytest.mark.slow
def test_quick_run_of_blues_torch_and_the_transformers_peer(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "bench", "--what", "quality", "--quick", "--rows", "torch,hf",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "time_to_quality.json").read_text())
    assert [r["row"] for r in data["rows"]] == ["torch", "hf"]
    for r in data["rows"]:
        # both evaluated at steps 2 and 4 (the quick recipe) and reached the loose target
        assert r["status"] == "ok" and [e["step"] for e in r["evals"]] == [2, 4], r
        assert r["time_s"] is not None and r["tokens_per_s"] > 0
        assert not (out / "quality" / r["row"] / "checkpoints").exists()
    # the same validation windows: an untrained model scores near ln V, so both start near V = 200,019
    assert all(1e5 < r["evals"][0]["ppl"] < 4e5 for r in data["rows"])
    assert "| Blues, PyTorch (`train_torch.py`, eager) |" in proc.stdout and "fastest peer's time" in proc.stdout
