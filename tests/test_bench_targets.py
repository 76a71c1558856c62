"""bench/report.py's targets: issue 26's thresholds applied to rows of one results file.

The rows are made up around each threshold (a little above and a little below), so each line's
met / MISSED must follow the numbers; the peers are found by their variants as the peer sections
name them (bench/peer.py, bench/peer_torchtitan.py).
"""
from bench.peer_torchtitan import VARIANT as TITAN
from bench.report import Results, Row

FLOPS_PER_TOKEN = 3.38e9  # ~ the bench preset's model FLOPs per token (bench/mfu.py), for the MFU line


def _results(tmp_path, rows, gpu="NVIDIA H200"):
    res = Results(tmp_path)
    res.data["meta"] = {"gpu": gpu}
    for row in rows:
        res.add(row)
    return res


def _line(lines, *words):
    found = [t for t in lines if all(w in t for w in words)]
    assert len(found) == 1, (words, lines)
    return found[0]


def test_training_targets_against_both_peers_and_the_datasheet(tmp_path):
    res = _results(tmp_path, [
        Row("peer", "train bench", "hf mixtral compile", tokens_per_s=100e3, peak_gib=50.0),
        Row("peer", "train bench", "hf mixtral", tokens_per_s=40e3, peak_gib=70.0),  # eager: not the target's peer
        Row("peer", "train bench", f"{TITAN} compile", tokens_per_s=50e3, peak_gib=45.0),
        Row("torch", "train bench", "compile", tokens_per_s=151e3, peak_gib=34.0, flops_per_token=FLOPS_PER_TOKEN,
            dense_framework="torch"),
        Row("jax", "train bench", "jit", tokens_per_s=145e3, peak_gib=36.0, flops_per_token=FLOPS_PER_TOKEN,
            dense_framework="jax"),
        Row("torch+deepspeed", "train bench", "zero2-compile", tokens_per_s=143e3, peak_gib=35.0),
        Row("peer", "train tiny", "hf mixtral compile", tokens_per_s=400e3),
        Row("torch", "train tiny", "compile", tokens_per_s=990e3),
        Row("jax", "train tiny", "jit", tokens_per_s=1010e3),
        Row("torch", "train tiny", "compile cuda graph", tokens_per_s=1020e3),
    ])
    lines = res.targets()
    hf_torch = _line(lines, "train bench torch compile", "compiled transformers")
    assert "1.51x" in hf_torch and "(>= 1.5x: met)" in hf_torch and "0.68x its memory (<= 0.7x: met)" in hf_torch
    hf_jax = _line(lines, "train bench jax jit", "compiled transformers")
    assert "1.45x" in hf_jax and "MISSED" in hf_jax and "0.72x its memory (<= 0.7x: MISSED)" in hf_jax
    assert "(>= 1.3x: met)" in _line(lines, "train bench torch compile", "torchtitan")
    mfu = _line(lines, "train bench torch compile", "MFU ")  # 151e3 * 3.38e9 / 989e12 = 51.6%
    assert "51.6%" in mfu and "met" in mfu
    assert "49.6%" in _line(lines, "train bench jax jit", "MFU ")  # 145e3 * 3.38e9 / 989e12
    assert "MISSED" in _line(lines, "train bench jax jit", "MFU ")
    ds = _line(lines, "train bench deepspeed")
    assert "0.947" in ds and "MISSED" in ds
    assert "2.48x compiled transformers' tokens/s (>= 2.5x: MISSED)" in _line(lines, "train tiny torch compile:")
    assert "(>= 2.5x: met)" in _line(lines, "train tiny jax jit", "compiled transformers")
    assert "2.55x compiled transformers' tokens/s (>= 2.5x: met)" in _line(lines, "train tiny torch compile cuda graph")
    assert not [t for t in lines if "train tiny" in t and "torchtitan" in t]  # no torchtitan row at tiny


def test_decode_targets(tmp_path):
    res = _results(tmp_path, [Row("torch", "decode b1", "bf16 compile", tokens_per_s=8100),
                              Row("jax", "decode b64", "bf16", tokens_per_s=399e3)])
    lines = res.targets()
    assert "(>= 8,000: met)" in _line(lines, "decode tiny b1 torch")
    assert "(>= 400,000: MISSED)" in _line(lines, "decode tiny b64 jax")


def test_vs_peer_is_compiled_transformers_where_it_ran(tmp_path):
    """The "vs peer" column names its peer and prefers compiled transformers (issue 26's), whatever
    order the peer rows were added in; eager transformers where only it ran."""
    torch_row = Row("torch", "train tiny", "compile", tokens_per_s=900e3)
    res = _results(tmp_path, [Row("peer", "train tiny", "hf mixtral", tokens_per_s=150e3),
                              Row("peer", "train tiny", f"{TITAN} compile", tokens_per_s=250e3), torch_row])
    assert res.peer_of(torch_row).variant == "hf mixtral"
    res.add(Row("peer", "train tiny", "hf mixtral compile", tokens_per_s=400e3))
    line = next(t for t in res.table().splitlines() if "| torch | train tiny | compile |" in t)
    assert "2.25x tok/s (hf mixtral compile)" in line
