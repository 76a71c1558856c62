"""PyTorch's Triton kernels in Triton's interpreter, on a CPU: `python tests/triton_interpreted.py CHECK`
with TRITON_INTERPRET=1 set (tests/test_triton_interpreter.py runs each check in its own process, as
Triton reads the variable when it is imported). Exits 0 when the check holds.

The interpreter runs each program of a launch with numpy, so these checks hold the kernels' indexing,
masks, online softmaxes and float32 math to the functions they compute (tests/kernel_cases.py, the
GPU tests' cases at smaller sizes); their compile for a GPU is tests/test_decode_kernels.py's sm_90
check, and their speed and GPU results are tests/test_gpu.py's and the benchmark's. A kernel with a
`tl.dot` (the fused greedy head) runs in float16 and float32 here: the interpreter's bf16 dot is
wrong (a 16 x 16 product came out ~1e10 off, Triton 3.6 and 3.7); the GPU tests run it in bf16.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the checkout, and tests/

from blues.config import BluesConfig  # noqa: E402
from blues.sampling import SamplingParams  # noqa: E402
from blues.xent_launch import Launch  # noqa: E402
from blues_torch import decode_attention, generation, greedy_head, xent_kernel  # noqa: E402
from blues_torch.attention import reference_attention  # noqa: E402
from kernel_cases import check_gated_gelu_backward, check_loss_kernels  # noqa: E402
from oracle import random_canonical  # noqa: E402
from parity.convert import from_canonical  # noqa: E402


def loss_kernels() -> None:
    """The loss kernels at V 10001 in Vp 10048 (a partial last piece) with three launches: one program
    a row (the trainer's), three programs a row of 1024-column pieces (the last split's last two
    pieces wholly past Vp), and four asked of a row of three pieces (fitted to three)."""
    g = torch.Generator().manual_seed(8)
    for launch in (xent_kernel.LAUNCH, Launch(1024, 3, 4), Launch(4096, 4, 4)):
        check_loss_kernels(48, 10001, 10048, g, launch)


def gated_gelu_backward() -> None:
    """The experts' fused gated-GeLU backward on a row count and a width its blocks do not divide."""
    check_gated_gelu_backward(torch.ops.blues.gated_gelu_backward, 101, 384, torch.Generator().manual_seed(6))


def fused_greedy_head() -> None:
    """greedy_head.greedy_tokens against the first maximum of the head's logits (the float32 product
    rounded to the table's dtype), float32 and float16: batches in one tile of rows and across several
    (the last partial), a vocabulary ending inside a block and whole blocks of padding whose logits
    would win if read. Normal weights, and small integers: their logits are exact in any order of
    summation, so rows tie exactly and often (the interpreter's numpy GEMM rounds equal columns
    differently at different positions, so copies of a table row would not tie in float32), and the
    first maximum must win. (Planted: ties to the higher id, or the padding not masked: each fails.)"""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        for batch, v, vp, d in ((1, 1000, 1024, 64), (5, 777, 1024, 96), (40, 300, 512, 48), (3, 129, 384, 16)):
            for draw in (torch.randn, lambda *shape, generator: torch.randint(-2, 3, shape, generator=generator)):
                h = draw(batch, d, generator=g).to(dtype)  # [B, d]
                table = draw(vp, d, generator=g).to(dtype)  # [Vp, d]
                table[v:] = h.float().sum(0).sign().to(dtype) * 4  # padding rows: larger logits than any real row
                logits = (h.float() @ table.float().T).to(dtype).float()  # [B, Vp]
                want = logits[:, :v].argmax(-1)  # [B], the first maximum
                assert (logits[:, v:].amax(-1) > logits[:, :v].amax(-1)).any()  # the padding would win
                got = greedy_head.greedy_tokens(h, table, v)
                assert got.dtype == torch.int64 and torch.equal(got, want), (dtype, batch, v, got, want)


def decode_attention_kernel() -> None:
    """decode_attention.decode_attention against the reference attention under the cache's mask
    (slots <= index, and >= the row's start or == index): several blocks of slots with a partial
    last one, a head dimension padded (48 in 64), GQA groups of 1, 2 and 4, softcap, a row that is all
    padding but its own slot; float32 (1e-5 allows the different order of the sums) and bf16 (the
    output rounded once: one bf16 unit). (Planted: the padding rule dropped: it fails.)"""
    g = torch.Generator().manual_seed(5)
    for (b, h, kv, dh, s, softcap) in ((3, 4, 2, 48, 288, None), (2, 4, 1, 64, 100, 30.0), (2, 8, 8, 16, 40, None)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
            q = torch.randn(b, h, dh, generator=g).to(dtype)  # [B, H, Dh]
            k, v = (torch.randn(b, s, kv, dh, generator=g).to(dtype) for _ in range(2))  # [B, S, K, Dh]
            index = torch.tensor(s * 2 // 3)
            start = torch.randint(0, s // 2, (b,), generator=g)
            start[0] = index  # row 0: a padding token, which sees only its own slot
            slots = torch.arange(s)
            mask = (slots <= index) & ((slots[None] >= start[:, None]) | (slots == index))  # [B, S]
            want = reference_attention(q[:, None].float(), k.float(), v.float(), softcap=softcap,
                                       mask=mask[:, None])[:, 0]  # [B, H, Dh]
            got = decode_attention.decode_attention(q, k, v, index, start, softcap)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=tol, atol=tol)


def decoding_through_the_kernels() -> None:
    """Greedy and sampled decoding of a small model with both kernels taken (they apply on CUDA
    devices only: forced here), float32 and float16, three prompt lengths in one batch (rows of
    padding): the same tokens as the model's own head and attention emit."""
    cfg = BluesConfig(vocab_size=512, max_position_embeddings=64, num_layers=2, hidden_size=32, head_dim=24,
                      num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                      embedding_multiplier_scale=2)
    model = from_canonical(random_canonical(cfg, seed=1), cfg, "torch").eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 10, 11], [100, 200, 300, 400, 500, 11, 12, 13, 14, 15, 16, 17]]
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20, seed=4)]
    fused_applies, applies = greedy_head.fused_applies, decode_attention.applies
    for dtype in (torch.float32, torch.float16):
        model = model.to(dtype)
        want = [generation.generate(model, prompts, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        greedy_head.fused_applies, decode_attention.applies = (lambda h: True), (lambda q: q.shape[1] == 1)
        generation._DECODERS.clear()
        got = [generation.generate(model, prompts, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        # The kernel applies the mask's rule itself: the last decode step built no [B, 1, S] mask.
        assert next(iter(generation._DECODERS.values())).cache._mask is None
        greedy_head.fused_applies, decode_attention.applies = fused_applies, applies
        generation._DECODERS.clear()
        assert got == want, (dtype, got, want)


def compiled_decoding_through_the_kernels() -> None:
    """The decode step torch.compile'd (inductor) with both kernels taken, as `generate(compile=True)` runs
    it on a GPU: the kernels reach the compiled graph as the opaque custom ops blues::greedy_tokens and
    blues::decode_attention (a fullgraph compile of each passes), and greedy and sampled decoding emit
    the eager model's tokens."""
    cfg = BluesConfig(vocab_size=512, max_position_embeddings=64, num_layers=1, hidden_size=32, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                      embedding_multiplier_scale=2)
    model = from_canonical(random_canonical(cfg, seed=2), cfg, "torch").eval()
    gen = torch.Generator().manual_seed(0)
    h, table = torch.randn(3, 32, generator=gen), torch.randn(512, 32, generator=gen)
    head = torch.compile(lambda h, table: greedy_head.greedy_tokens(h * 2.0, table, 500) + 1, fullgraph=True)
    assert torch.equal(head(h, table), greedy_head.greedy_tokens(h * 2.0, table, 500) + 1)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((2, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16)))
    index, start = torch.tensor(5), torch.tensor([0, 3])
    attend = torch.compile(lambda q: decode_attention.decode_attention(q * 2.0, k, v, index, start, 30.0) + 1,
                           fullgraph=True)
    torch.testing.assert_close(attend(q), decode_attention.decode_attention(q * 2.0, k, v, index, start, 30.0) + 1,
                               rtol=0, atol=0)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 10, 11]]
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20, seed=4)]
    want = [generation.generate(model, prompts, 6, p, eot_id=0, stop_at_eot=False) for p in settings]
    fused_applies, applies = greedy_head.fused_applies, decode_attention.applies
    greedy_head.fused_applies, decode_attention.applies = (lambda h: True), (lambda q: q.shape[1] == 1)
    generation._DECODERS.clear()
    try:
        got = [generation.generate(model, prompts, 6, p, eot_id=0, stop_at_eot=False, compile=True)
               for p in settings]
    finally:
        greedy_head.fused_applies, decode_attention.applies = fused_applies, applies
        generation._DECODERS.clear()
    assert got == want, (got, want)


CHECKS = {"loss_kernels": loss_kernels, "gated_gelu_backward": gated_gelu_backward,
          "fused_greedy_head": fused_greedy_head, "decode_attention_kernel": decode_attention_kernel,
          "decoding_through_the_kernels": decoding_through_the_kernels,
          "compiled_decoding_through_the_kernels": compiled_decoding_through_the_kernels}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    assert xent_kernel.triton is not None, "Triton is not installed"
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
