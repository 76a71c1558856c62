"""GPU fast paths against their reference paths (marked `gpu`; skipped without a CUDA device).

Each fast kernel must compute the function its reference defines: SDPA / cuDNN attention vs the
plain einsum attention, `torch._grouped_mm` experts vs the per-expert loop, the chunked LM loss vs
materialised logits, and the two frameworks against each other in bf16 (by KL, as bf16 rounding
makes elementwise float32 tolerances meaningless). The same checks run inside the benchmark
(`bench/`) before anything is timed. Tolerances: bf16 has an 8-bit mantissa (relative rounding
~4e-3 per operation); after a few accumulated operations 2e-2 relative is the honest bound.
"""
import numpy as np
import pytest

from blues.config import BluesConfig
from oracle import random_canonical

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from kernel_cases import check_gated_gelu_backward, check_loss_kernels  # noqa: E402

CUDA = torch.cuda.is_available()
JAX_GPU = any(d.platform == "gpu" for d in jax.devices()) if CUDA else False
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch)")
needs_jax_gpu = pytest.mark.skipif(not JAX_GPU, reason="needs a GPU visible to JAX")
pytestmark = pytest.mark.gpu

BF16_REL = 2e-2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def qkv(seed=0, b=2, t=256, h=4, kv=2, dh=48):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32)
            for shape in ((b, t, h, dh), (b, t, kv, dh), (b, t, kv, dh))]


@needs_cuda
def test_sdpa_matches_reference_attention_gpu():
    from blues_torch.attention import attention, reference_attention
    q, k, v = (torch.from_numpy(a).cuda() for a in qkv())
    fast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), softcap=None, impl="sdpa")
    ref = reference_attention(q, k, v, softcap=None)
    assert rel_err(fast.float().cpu(), ref.cpu()) < BF16_REL


@needs_jax_gpu
def test_cudnn_matches_reference_attention_gpu():
    from blues_jax.attention import attention, reference_attention
    q, k, v = (jnp.asarray(a) for a in qkv())
    fast = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                     softcap=None, impl="cudnn")
    ref = reference_attention(q, k, v, softcap=None)
    assert rel_err(np.asarray(fast, np.float32), np.asarray(ref)) < BF16_REL


def expert_inputs(seed, *, n, d, f, e, k):
    """float32 CUDA tensors for expert_mlp: x [n, d], distinct experts [n, k], gate weights, w_in, w_out."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).cuda()
    w_in = torch.from_numpy(rng.standard_normal((e, d, 2 * f)).astype(np.float32) / d ** 0.5).cuda()
    w_out = torch.from_numpy(rng.standard_normal((e, f, d)).astype(np.float32) / f ** 0.5).cuda()
    indices = torch.from_numpy(np.stack([rng.permutation(e)[:k] for _ in range(n)])).cuda()
    weights = torch.softmax(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).cuda(), -1)
    return x, indices, weights, w_in, w_out


@needs_cuda
def test_grouped_gemm_matches_expert_loop_gpu():
    from blues_torch.experts import _grouped_mm_ok, expert_mlp
    x, indices, weights, w_in, w_out = expert_inputs(1, n=1024, d=256, f=512, e=8, k=2)
    assert _grouped_mm_ok(x.bfloat16(), w_in.bfloat16(), w_out.bfloat16()), "the grouped path must be taken"
    fast = expert_mlp(x.bfloat16(), indices, weights, None, w_in.bfloat16(), w_out.bfloat16())
    loop = expert_mlp(x, indices, weights, None, w_in, w_out)  # float32: the per-expert loop
    assert rel_err(fast.float().cpu(), loop.cpu()) < BF16_REL


@needs_jax_gpu
def test_mosaic_grouped_matmul_matches_ragged_dot_gpu():
    """Product, input gradient and weight gradient of the Mosaic kernels vs lax.ragged_dot, on group
    sizes that are empty, smaller than a tile and not multiples of one."""
    from blues_jax.grouped_matmul import grouped_matmul, mosaic_applies
    sizes = jnp.asarray([300, 0, 17, 1024, 64, 599], jnp.int32)  # M = 2004
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(kx, (int(sizes.sum()), 256), jnp.bfloat16)  # [M, K]
    rhs = (jax.random.normal(kw, (6, 256, 384), jnp.float32) / 16).astype(jnp.bfloat16)  # [G, K, N]
    cot = jax.random.normal(kg, (int(sizes.sum()), 384), jnp.bfloat16)  # [M, N]
    if not mosaic_applies(lhs, rhs):
        pytest.skip("the Mosaic grouped GEMM needs a Hopper GPU")

    def run(impl):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, impl=impl), lhs, rhs)
        return (out, *vjp(cot))

    for got, want, what in zip(jax.jit(lambda: run("mosaic"))(), jax.jit(lambda: run("ragged_dot"))(),
                               ("product", "input grad", "weight grad")):
        assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) < BF16_REL, what


@needs_jax_gpu
def test_sorted_mosaic_experts_match_blocks_gpu():
    """expert_mlp's sorted form on Mosaic grouped GEMMs against its blocks form: values and gradients,
    dropless and with a binding capacity."""
    from blues_jax.experts import capacity_keep, expert_mlp
    from blues_jax.grouped_matmul import mosaic_applies
    x, indices, weights, w_in, w_out = (jnp.asarray(t.cpu().numpy()) for t in expert_inputs(4, n=1024, d=256, f=512, e=8, k=2))
    x = x.astype(jnp.bfloat16)
    if not mosaic_applies(x, w_in.astype(jnp.bfloat16)):
        pytest.skip("the Mosaic grouped GEMM needs a Hopper GPU")
    cot = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    for keep, capacity in ((None, None), (capacity_keep(indices, 8, 200), 200)):
        def loss(x, weights, w_in, w_out, gemm):
            y = expert_mlp(x, indices, weights, keep, w_in, w_out, capacity=capacity, gemm=gemm)
            return jnp.sum(y.astype(jnp.float32) * cot)

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
        for got, want in zip(jax.tree.leaves(grad(x, weights, w_in, w_out, "mosaic")),
                             jax.tree.leaves(grad(x, weights, w_in, w_out, "blocks"))):
            assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) < BF16_REL


# The experts' gated GeLU kernels compute the float32 definition and round once to bf16, as the
# references below do: they may differ by one bf16 unit (2^-7 of the value at most) where the two
# float32 results straddle a rounding boundary. JAX's kernels carry their own erf (4.2e-7 from
# math.erf), whose error reaches the outputs times |gate * value| / 2: atol 2e-5 at these scales.

@needs_cuda
def test_gated_gelu_triton_backward_matches_aten_gpu():
    """blues_torch/gated_gelu.py's Triton backward, eager and compiled into one graph, against the
    aten formula it replaces, on a row count and a width its blocks do not divide (masked edges)."""
    from blues_torch import gated_gelu
    if not gated_gelu.fused_applies(torch.empty(0, device="cuda")):
        pytest.skip("needs Triton")
    g = torch.Generator(device="cuda").manual_seed(6)
    compiled = torch.compile(gated_gelu.backward, fullgraph=True)
    for backward in (gated_gelu.backward, compiled):
        check_gated_gelu_backward(backward, 1001, 384, g)


@needs_jax_gpu
def test_gated_gelu_pallas_kernels_match_definition_gpu():
    """blues_jax/gated_gelu.py's Pallas kernels, compiled by Triton, against the definition and its
    autodiff gradient (the CPU test runs them in Pallas's interpreter)."""
    from blues_jax import gated_gelu
    m, f = 1000, 384  # blocks of 8 x 128
    kh, kg = jax.random.split(jax.random.key(6))
    hidden = (2 * jax.random.normal(kh, (m, 2 * f), jnp.float32)).astype(jnp.bfloat16)
    d_act = jax.random.normal(kg, (m, f), jnp.bfloat16)
    want_act, vjp = jax.vjp(lambda h: gated_gelu.gated_gelu(h, f), hidden.astype(jnp.float32))
    (want_d_hidden,) = vjp(d_act.astype(jnp.float32))
    act = jax.jit(lambda h: gated_gelu.forward(h, f, fused=True))(hidden)
    act_again, d_hidden = jax.jit(lambda h, d: gated_gelu.backward(h, d, fused=True))(hidden, d_act)
    np.testing.assert_array_equal(np.asarray(act_again, np.float32), np.asarray(act, np.float32))
    for got, want in ((act, want_act), (d_hidden, want_d_hidden)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2 ** -7, atol=2e-5)


@needs_jax_gpu
def test_jax_loss_kernel_matches_xla_gpu():
    """blues_jax/xent_kernel.py's Pallas kernel, compiled by Triton, at the real vocabulary (V 200019
    in Vp 200064: a partial last piece and padding columns) against XLA's form, alone and inside the
    chunked loss with its gradients (bf16 logits as in training; tolerances as the CPU tests')."""
    from blues_jax import xent_kernel
    from blues_jax.loss import chunked_lm_loss
    r, d, v, vp = 2048, 256, 200019, 200064
    kl, kt, kh, ke = jax.random.split(jax.random.key(8), 4)
    logits = (3 * jax.random.normal(kl, (r, vp), jnp.float32)).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (r,), 0, v).at[:2].set(jnp.array([0, v - 1]))
    scale = jnp.where(jnp.arange(r) % 7 == 0, 0.0, 1.0 / r)
    nll, grad = jax.jit(lambda *a: xent_kernel.softmax_xent(*a, v, fused=True))(logits, targets, scale)
    want_nll, want_grad = jax.jit(lambda *a: xent_kernel.softmax_xent(*a, v, fused=False))(logits, targets, scale)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want_nll), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), rtol=2 ** -7, atol=1e-12)
    assert float(jnp.abs(grad[:, v:].astype(jnp.float32)).max()) == 0.0

    h = jax.random.normal(kh, (4, 512, d), jnp.float32).astype(jnp.bfloat16)
    embed = (jax.random.normal(ke, (vp, d), jnp.float32) / d ** 0.5).at[v:].set(0.0)
    t = jax.random.randint(kt, (4, 512), 0, v).at[0, :9].set(-100)
    fn = jax.jit(jax.value_and_grad(lambda h, e, fused: chunked_lm_loss(h, e, t, v, 1024, fused=fused),
                                    argnums=(0, 1)), static_argnums=2)
    (got, grads), (want, want_grads) = fn(h, embed, True), fn(h, embed, False)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    for g, w in zip(grads, want_grads):
        assert rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) < 1e-3


@needs_cuda
def test_torch_loss_kernel_matches_aten_gpu(monkeypatch):
    """blues_torch/xent_kernel.py's Triton kernels at the real vocabulary (V 200019 in Vp 200064: a
    partial last piece, and padding columns holding garbage that must be ignored) against the float32
    aten form, alone and inside the chunked loss with its gradients under bf16 autocast, against the
    same loss with the kernels off (the compiled aten form); tolerances in tests/kernel_cases.py."""
    from blues_torch import loss, xent_kernel
    r, d, v, vp = 2048, 256, 200019, 200064
    g = torch.Generator(device="cuda").manual_seed(8)
    check_loss_kernels(r, v, vp, g)

    h = (torch.randn(4, 512, d, device="cuda", generator=g)).requires_grad_()
    embed = torch.randn(vp, d, device="cuda", generator=g) / d ** 0.5
    embed[v:] = 0.0
    embed.requires_grad_()
    t = torch.randint(0, v, (4, 512), device="cuda", generator=g)
    t[0, :9] = -100

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = loss.chunked_lm_loss(h, embed, t, v, 1024)
        return out, torch.autograd.grad(out, (h, embed))

    got, grads = loss_and_grads()
    monkeypatch.setattr(xent_kernel, "fused_applies", lambda logits: False)
    want, want_grads = loss_and_grads()
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    for a, b in zip(grads, want_grads):
        assert rel_err(a.cpu(), b.cpu()) < 1e-3
    assert torch.count_nonzero(grads[1][v:]) == 0


@needs_cuda
def test_dense_decode_experts_match_expert_loop_gpu():
    """Decode-sized blocks without gradients take the dense path (every expert on every row)."""
    from blues_torch.experts import capacity_keep, expert_mlp
    x, indices, weights, w_in, w_out = expert_inputs(3, n=64, d=192, f=768, e=4, k=2)
    for keep in (None, capacity_keep(indices, 4, 20)):
        loop = expert_mlp(x, indices, weights, keep, w_in, w_out)  # grad enabled: the per-expert loop
        with torch.no_grad():
            dense32 = expert_mlp(x, indices, weights, keep, w_in, w_out)
            dense16 = expert_mlp(x.bfloat16(), indices, weights, keep, w_in.bfloat16(), w_out.bfloat16())
        assert rel_err(dense32.cpu(), loop.detach().cpu()) < 1e-5  # float32: rounding only
        assert rel_err(dense16.float().cpu(), loop.detach().cpu()) < BF16_REL


@needs_cuda
def test_greedy_argmax_is_first_maximum_gpu():
    from blues_torch.generation import greedy_argmax
    g = torch.Generator(device="cuda").manual_seed(5)
    for b, v in ((1, 200019), (64, 200019), (3, 129)):
        x = torch.randint(-2, 3, (b, v), generator=g, device="cuda").to(torch.bfloat16)  # ties everywhere
        assert torch.equal(greedy_argmax(x), x.float().argmax(-1).to(torch.int64)), (b, v)


def _head_draws(seed, batch, d=192, v=200019, vp=200064):
    """(draw, h [B, d], table [Vp, d]) with small-integer entries: every logit is an integer below
    2^24, exact in float32 whatever the GEMM's order of summation and exact in bf16 up to 256, so
    the fused head and the reference must pick the same ids, ties included."""
    rng = np.random.default_rng(seed)
    for draw in ("ties", "wide", "negative"):
        lo, hi = (-2, 3) if draw == "ties" else (-8, 9)
        h, t = rng.integers(lo, hi, (batch, d)), rng.integers(lo, hi, (vp, d))
        if draw == "negative":  # every real logit < 0: a padding column counted as 0 would win
            h, t = np.abs(h) + 1, -np.abs(t) - 1
        t[v:] = 9  # padding rows: large logits that must never win
        yield draw, h.astype(np.float32), t.astype(np.float32)


@needs_cuda
def test_fused_greedy_head_is_argmax_of_the_logits_gpu():
    """blues_torch/greedy_head.py's Triton kernels at the real vocabulary against greedy_argmax of
    the head's bf16 logits: one partial row tile, one whole, two."""
    from blues_torch.generation import greedy_argmax
    from blues_torch.greedy_head import greedy_tokens
    from blues_torch.loss import lm_head_logits
    for batch in (1, 5, 64, 100):
        for draw, h, t in _head_draws(batch, batch):
            h, t = (torch.from_numpy(a).cuda().bfloat16() for a in (h, t))
            want = greedy_argmax(lm_head_logits(h, t, 200019))
            assert torch.equal(greedy_tokens(h, t, 200019), want), (batch, draw)


@needs_jax_gpu
def test_fused_greedy_head_pallas_is_argmax_of_the_logits_gpu():
    """blues_jax/greedy_head.py's Pallas kernels, compiled by Triton, against argmax of the head's
    float32 logits, as the torch test."""
    from blues_jax.greedy_head import greedy_tokens
    from blues_jax.loss import lm_head_logits
    for batch in (1, 5, 64, 100):
        for draw, h, t in _head_draws(batch, batch):
            h, t = jnp.asarray(h, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
            want = jnp.argmax(lm_head_logits(h, t, 200019), axis=-1)
            got = jax.jit(greedy_tokens, static_argnums=2)(h, t, 200019)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{batch}, {draw}")


def _decode_attention_case(seed, b, h=4, kv=2, dh=48, s=288):
    """q [B, H, Dh], k/v [B, S, K, Dh], the step's slot, each row's first real slot (row 0 a padding
    query) and the cache's mask [B, 1, S], as tests/test_decode_kernels.py builds them."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, h, dh), (b, s, kv, dh), (b, s, kv, dh)))
    index, start = s * 2 // 3, rng.integers(0, s // 2, b)
    start[0] = index
    keys = np.arange(s)
    return q, k, v, index, start, ((keys <= index) & ((keys[None] >= start[:, None]) | (keys == index)))[:, None, :]


@needs_cuda
def test_decode_attention_matches_reference_gpu():
    """blues_torch/decode_attention.py's Triton kernel against the reference attention under the
    cache's mask: float32 (1e-5: only the order of the sums differs) and bf16 inputs (the kernel
    computes in float32 and rounds its output once: BF16_REL)."""
    from blues_torch.attention import reference_attention
    from blues_torch.decode_attention import decode_attention
    for b, softcap in ((1, None), (64, None), (3, 30.0)):
        q, k, v, index, start, mask = (torch.from_numpy(np.asarray(a)).cuda() for a in _decode_attention_case(b, b))
        want = reference_attention(q[:, None], k, v, softcap=softcap, mask=mask)[:, 0]
        got = decode_attention(q, k, v, index, start, softcap)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (b, softcap, (got - want).abs().max())
        got16 = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), index, start, softcap)
        want16 = reference_attention(q.bfloat16()[:, None], k.bfloat16(), v.bfloat16(), softcap=softcap, mask=mask)[:, 0]
        assert rel_err(got16.float().cpu(), want16.float().cpu()) < BF16_REL, (b, softcap)


@needs_jax_gpu
def test_decode_attention_pallas_matches_reference_gpu():
    """blues_jax/decode_attention.py's Pallas kernel, compiled by Triton, as the torch test."""
    from blues_jax.attention import reference_attention
    from blues_jax.decode_attention import decode_attention
    for b, softcap in ((1, None), (64, None), (3, 30.0)):
        q, k, v, index, start, mask = _decode_attention_case(b, b)
        with jax.default_matmul_precision("float32"):  # the reference's einsums at full float32 (TF32 otherwise)
            want = np.asarray(reference_attention(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v),
                                                  softcap=softcap, mask=jnp.asarray(mask))[:, 0])
        run = jax.jit(lambda *a: decode_attention(*a, softcap))
        got = run(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(index), jnp.asarray(start, jnp.int32))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f"{b}, {softcap}")


def _bf16_decode_models():
    from parity.convert import from_canonical
    config = BluesConfig(vocab_size=200019, max_position_embeddings=64)  # tiny's widths
    arrays = random_canonical(config, seed=11)
    tm = from_canonical(arrays, config, "torch").cuda().eval().to(torch.bfloat16)
    jm = from_canonical(arrays, config, "jax", dtype=jnp.bfloat16)
    jm.eval()
    prompts = np.random.default_rng(12).integers(0, config.vocab_size - 1, (3, 9)).tolist()
    return config, tm, jm, prompts


@needs_cuda
@needs_jax_gpu
def test_greedy_generation_with_the_fused_head_gpu():
    """Greedy decoding of a bf16 model with the fused head (CUDA-graph step in PyTorch, the compiled
    loop in JAX) emits the tokens the logits' argmax emits (`fused_head=False`). The layers' kernels
    are the same in both runs, so only the head differs; with random weights a flip needs two logits
    within the GEMMs' float32 rounding of each other (~1e-4 per token)."""
    from blues.sampling import SamplingParams
    from blues_jax import generation as jgen
    from blues_torch import generation as tgen
    config, tm, jm, prompts = _bf16_decode_models()
    greedy = SamplingParams(temperature=0.0)
    for fused in (True, False):
        torch_ids = tgen.generate(tm, prompts, 24, greedy, eot_id=0, stop_at_eot=False, fused_head=fused)
        decoder = next(iter(tgen._DECODERS.values()))
        assert decoder.fused_head is fused and decoder.graph is not None
        jax_ids = jgen.generate(jm, prompts, 24, greedy, eot_id=0, stop_at_eot=False, fused_head=fused)
        if fused:
            fused_ids = torch_ids, jax_ids
    assert fused_ids[0] == torch_ids  # PyTorch
    assert fused_ids[1] == jax_ids  # JAX


@needs_cuda
def test_chunked_loss_matches_plain_gpu():
    from blues_torch.loss import chunked_lm_loss, cross_entropy, lm_head_logits
    rng = np.random.default_rng(2)
    n, d, v, vp = 4096, 192, 200019, 200064
    h = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).cuda().requires_grad_()
    embed = torch.zeros(vp, d, device="cuda")
    embed[:v] = torch.from_numpy(rng.standard_normal((v, d)).astype(np.float32) / d ** 0.5).cuda()
    embed.requires_grad_()
    targets = torch.from_numpy(rng.integers(0, v, n)).cuda()
    targets[::7] = -100
    chunked = chunked_lm_loss(h, embed, targets, v, 1024)
    g_chunked = torch.autograd.grad(chunked, (h, embed))
    plain = cross_entropy(lm_head_logits(h, embed, v), targets)
    g_plain = torch.autograd.grad(plain, (h, embed))
    # float32 on both sides (TF32 off by default for matmuls in torch): rounding-level agreement.
    assert abs(chunked.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for a, b in zip(g_chunked, g_plain):
        assert rel_err(a.cpu(), b.cpu()) < 1e-4
    assert torch.count_nonzero(g_chunked[1][v:]) == 0  # padding rows get exactly zero gradient
    # bf16 GEMMs (autocast, as in training): the gradient of the embedding accumulates in the GEMM's
    # float32 C operand; bf16 operands put the agreement at METHOD.md's 1e-3..1e-2.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked16 = chunked_lm_loss(h, embed, targets, v, 1024)
        g_chunked16 = torch.autograd.grad(chunked16, (h, embed))
    assert abs(chunked16.item() - plain.item()) <= 1e-3 * abs(plain.item())
    for a, b in zip(g_chunked16, g_plain):
        assert rel_err(a.cpu(), b.cpu()) < BF16_REL


@needs_cuda
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_compiled_training_gradients_match_eager_gpu(weights):
    """torch.compile's training step computes the gradients eager PyTorch does, through every fast
    path at once (grouped GEMMs, the Triton GeLU backward, SDPA, the chunked loss and its Triton
    kernels): float32 weights under bf16 autocast (train_torch.py) and a bf16 module (DeepSpeed's bf16
    mode). Both bf16 steps are measured against eager float32, router noise off so that all take the
    same routes as far as rounding lets them. Compiled bf16 is to be no further from float32 than
    eager bf16 is, within 0.1: round 8's compiled-vs-eager differences were <= 7.4% (H200). A gradient
    path lost in the compiled graph is 1.0 from float32: under torch 2.11 the RMSNorm's no-op `.to`
    made every layer's gradient zero (blues_torch/model.py, _RMSNormFunction)."""
    import dataclasses
    from bench.train_step import compiled_gradient_errors
    from blues_torch import BluesModel
    config = dataclasses.replace(BluesConfig.preset("bench"), num_layers=2)
    torch.manual_seed(0)
    model = BluesModel(config).cuda().train()
    if weights == "bfloat16":
        model = model.bfloat16()
    rng = np.random.default_rng(5)
    ids, targets = (torch.from_numpy(rng.integers(0, config.vocab_size, (2, 512))).cuda() for _ in range(2))
    errors = compiled_gradient_errors(model, ids, targets, autocast=weights == "float32")
    excess = sorted(((c - e, name, c, e) for name, (c, e) in errors.items()), reverse=True)
    assert excess[0][0] < 0.1, excess[:4]
    assert max(e for _, _, _, e in excess) < 0.5, excess[:4]  # eager bf16 itself near float32


@needs_cuda
@needs_jax_gpu
def test_bf16_frameworks_agree_by_kl_gpu():
    from parity.convert import from_canonical
    config = BluesConfig(vocab_size=512, hidden_size=64, head_dim=16, num_attention_heads=4,
                         num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                         max_position_embeddings=64)
    arrays = random_canonical(config, seed=3)
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 64))
    tm = from_canonical(arrays, config, "torch").cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lt = tm(torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
    jm = from_canonical(arrays, config, "jax", dtype=jnp.bfloat16)
    jm.eval()
    lj = np.asarray(jm(jnp.asarray(ids)).logits, np.float32)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pt, pj = log_softmax(lt.astype(np.float64)), log_softmax(lj.astype(np.float64))
    kl = (np.exp(pt) * (pt - pj)).sum(-1)
    assert kl.mean() < 1e-2, kl.mean()  # MaxText's bf16 checker works at this scale


@needs_jax_gpu
def test_threefry_kernel_init_draws_the_same_weights_gpu(monkeypatch):
    """create_model draws its weights through JAX's threefry GPU kernel (a faster compile) on a
    one-device mesh: they must be bit for bit those of XLA's inlined threefry, which meshes of
    several devices use, so a seed means the same model on any mesh."""
    from flax import nnx
    from blues_jax.sharding import make_mesh
    from blues_jax.training import create_model
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    weights = {}
    for kernel in (False, True):
        monkeypatch.setattr("blues_jax.training.mesh_is_trivial", lambda _mesh, kernel=kernel: kernel)
        model = create_model(BluesConfig.preset("tiny"), mesh, seed=7, dtype=jnp.bfloat16)
        weights[kernel] = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert len(weights[True]) == len(weights[False]) > 10
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_array_equal(a, b)
