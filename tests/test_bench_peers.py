"""The peers and library kernels of the benchmark on a CPU, at toy shapes: torchtitan's model built
from Blues' config and trained a few steps through bench/peer_torchtitan.py, the compiled
Hugging Face row, the library-kernel rows' shapes, references and checks, and scripts/gpu_peers.sh's
section names. The GPU numbers come from scripts/gpu_peers.sh; here only the code paths.

torchtitan is an optional package (pip install 'blues[bench]'); its tests skip without it."""
import functools
import re
from pathlib import Path

import pytest
import torch

from bench import library_kernels, peer, peer_torchtitan
from bench.__main__ import parse_args
from bench.train_step import SHAPES, model_config, train_workload

REPO = Path(__file__).resolve().parent.parent


def needs_torchtitan():
    reason = peer_torchtitan.torchtitan_available()
    if reason is not None:
        pytest.skip(reason)


# ---- torchtitan -------------------------------------------------------------------------------------

def test_torchtitan_model_has_blues_shapes_and_compiles_per_block():
    needs_torchtitan()
    wl = train_workload("bench", quick=True)
    cfg = wl.config
    model = peer_torchtitan.build_titan(cfg, wl.seq, torch.device("cpu"),
                                        peer_torchtitan.job_config(wl.seq, compile=True, fused=False),
                                        peer_torchtitan.single_device())
    d, f, e = cfg.hidden_size, cfg.expert_hidden_size, cfg.tot_num_experts
    assert model.tok_embeddings.weight.shape == (cfg.vocab_size, d)
    assert model.output.weight is model.tok_embeddings.weight  # tied, as Blues
    assert len(model.layers) == cfg.num_layers
    block = model.layers["0"]
    attn, moe = block.attention, block.moe
    assert attn.wq.weight.shape == (cfg.num_attention_heads * cfg.head_dim, d)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (cfg.num_key_value_heads * cfg.head_dim, d)
    assert moe.experts.w1.shape == moe.experts.w3.shape == (e, f, d) and moe.experts.w2.shape == (e, d, f)
    assert moe.router.gate.weight.shape == (e, d) and moe.router.top_k == cfg.chosen_num_experts
    assert not moe.experts.use_grouped_mm  # the CPU build: its for-loop experts
    # its per-block compile: every MoE block's submodules but the experts are compiled wrappers
    compiled = {name for name, m in block.moe.named_children() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)}
    assert "router" in compiled and "experts" not in compiled
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights


def test_torchtitan_trains_on_cpu_and_its_loss_falls():
    needs_torchtitan()
    row = peer_torchtitan.titan_train(train_workload("tiny", quick=True), steps=2, warmup=1)
    assert row.error is None and row.skipped is None
    assert row.variant == f"torchtitan {peer_torchtitan.TORCHTITAN_VERSION} eager"  # no compile on a CPU
    assert row.check_ok, row.check
    assert row.tokens_per_s > 0 and "tied head" in row.notes and "for-loop" in row.notes


def test_cpu_int_histc_counts_as_the_gpu_does_and_is_restored():
    original = torch.histc
    ids = torch.tensor([0, 3, 3, 1, 3, 0])
    with pytest.raises(NotImplementedError):
        torch.histc(ids, bins=4, min=0, max=4)  # the gap it covers: no int64 kernel on a CPU
    with peer_torchtitan.cpu_int_histc(torch.device("cpu")):
        counts = torch.histc(ids, bins=4, min=0, max=4)
        assert counts.tolist() == torch.bincount(ids, minlength=4).tolist() and counts.dtype == ids.dtype
    assert torch.histc is original
    with peer_torchtitan.cpu_int_histc(torch.device("cuda")):  # nothing is touched on a GPU
        assert torch.histc is original


# ---- the compiled Hugging Face peer ----------------------------------------------------------------

def test_compiled_hf_peer_row(monkeypatch):
    """The compiled Mixtral row runs the model through dynamo (the eager backend: the same graph
    capture without inductor's C++ build on a CPU) and its loss falls."""
    pytest.importorskip("transformers")
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    row = peer.peer_train(train_workload("tiny", quick=True), steps=1, warmup=1, compile=True)
    assert row.variant == "hf mixtral compile" and row.check_ok, row.check
    assert counters["stats"]["unique_graphs"] >= 1
    assert "torch.compile(model), first step" in row.notes


# ---- library kernels --------------------------------------------------------------------------------

def test_kernel_shapes_are_the_training_steps():
    for preset in ("bench", "tiny"):
        cfg = model_config(preset, quick=False)
        b, t = SHAPES[preset]
        loss = library_kernels.kernel_shapes("loss", preset, quick=False)
        assert (loss["n"], loss["d"], loss["vocab"], loss["chunk"]) == (b * t, cfg.hidden_size, 200_019,
                                                                          cfg.default_loss_chunk_size)
        gelu = library_kernels.kernel_shapes("gated-gelu", preset, quick=False)
        assert (gelu["m"], gelu["f"]) == (b * t * cfg.chosen_num_experts, cfg.expert_hidden_size)
    assert library_kernels.kernel_shapes("gated-gelu", "bench", quick=False) == {"m": 32768, "f": 4096}


@pytest.mark.parametrize("kernel", library_kernels.KERNELS)
def test_kernel_rows_on_cpu(kernel):
    rows = library_kernels.kernel_rows(kernel, "tiny", quick=True, steps=1, warmup=0)
    ours = [r for r in rows if r.framework == "torch"]
    libraries = [r for r in rows if r.framework != "torch"]
    assert ours and all(r.check_ok and r.tokens_per_s > 0 for r in ours), [r.check for r in ours]
    assert libraries and all(r.skipped for r in libraries)  # Triton kernels: no CPU path
    assert all("CUDA" in r.skipped or "not importable" in r.skipped for r in libraries)


def test_kernel_check_catches_a_wrong_gelu(monkeypatch):
    """A gated GeLU that uses the tanh approximation where Blues defines the exact one is ~1e-3
    off (inside the bf16 tolerance); one that forgets the value half is O(1) off and fails."""
    import blues_torch.gated_gelu as gg
    monkeypatch.setattr(gg, "gated_gelu", lambda hidden: torch.nn.functional.gelu(hidden.chunk(2, dim=-1)[1]))
    (row,) = [r for r in library_kernels.kernel_rows("gated-gelu", "tiny", quick=True, steps=1, warmup=0)
              if r.framework == "torch"]
    assert row.check_ok is False and "out" in row.check


# ---- wiring -----------------------------------------------------------------------------------------

def test_cli_sections_and_gpu_peers_script():
    args = parse_args(["--what", "peer,kernels", "--torch-compile", "both"])
    assert {"peer-train", "titan-train", "peer-decode", "kernels"} <= set(args.sections)
    bench_sh = (REPO / "scripts" / "gpu_bench.sh").read_text()
    handled = set(re.findall(r"^    ([a-z-]+)\)", bench_sh, re.M))
    peers_sh = (REPO / "scripts" / "gpu_peers.sh").read_text()
    wanted = re.search(r"gpu_bench\.sh \$\{\*:-([a-z -]+)\}", peers_sh).group(1).split()
    assert wanted[0] == "dense" and {"titan-train", "peer-compile", "kernels", "compile"} <= set(wanted)
    assert set(wanted) <= handled, set(wanted) - handled
