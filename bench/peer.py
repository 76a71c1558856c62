"""The peer: Hugging Face `transformers` `MixtralForCausalLM` at the same size, in the same run.

The off-the-shelf choice a user would otherwise make: the same shapes as the Blues preset (d, L,
H x Dh, K KV heads, E experts top-k, F = d * multiplier, V, tied embeddings, the same RoPE theta
and RMSNorm eps, gated GeLU experts), SDPA attention, bf16 weights (no float32 master copy),
`torch.optim.AdamW(fused=True)` on them, gradient clipping at 1.0, router load-balancing loss on
(`output_router_logits=True` in training, coefficient as Blues'), and transformers' own default
expert kernel (5.x: `grouped_mm` where it can). What differs from Blues by design: Mixtral has
no post norms, no router z-loss and no router noise; these cost little and are noted, not
emulated.

Training, two rows: eager, and the whole model under `torch.compile(model)` (what one line buys
a user; its first step compiles for tens of seconds at the bench size and is a warm-up step).
The same random batch as Blues; HF shifts `labels = input_ids` itself, so it scores
T-1 positions per row (tokens/s counts all B*T input tokens, as for Blues). Decoding: greedy
`generate` with the default dynamic cache and with `cache_implementation="static"` (which
transformers may compile on a GPU: the warm-up call pays for that).

Checks: the initial loss is near ln V (a random-init LM predicts uniformly: a wrong vocabulary,
label shift or tying shows) and every loss is finite and falls on the repeated batch; decoding
returns every requested token. The peer has no fast-vs-reference path of ours to check.
"""
from __future__ import annotations

import math

import numpy as np

from blues.config import BluesConfig
from bench.decode import NEW_TOKENS, PROMPT, QUICK_NEW, QUICK_PROMPT, BATCHES, QUICK_BATCHES, decode_config, random_prompts
from bench.mfu import decode_flops_per_token
from bench.report import Row
from bench.timing import PeakMemory, log, time_steps, torch_sync
from bench.train_step import (GRAD_CLIP, LOOP_REPS, LR, WEIGHT_DECAY, Workload, fresh_torch_compile, loss_check,
                              random_batch, torch_device, _train_row)
from blues.adamw import BETAS, EPS

# ln V within 0.5: HF's init (std 0.02) gives near-zero logits, so the loss starts at ln V plus the
# small router aux term (coefficient 0.01 x ~k).
INIT_LOSS_TOL = 0.5


def transformers_available() -> str | None:
    try:
        import transformers  # noqa: F401
        from transformers import MixtralForCausalLM  # noqa: F401
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"transformers with Mixtral is not importable ({first}); pip install transformers"
    return None


def peer_config(cfg: BluesConfig):
    from transformers import MixtralConfig
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=True, num_local_experts=cfg.tot_num_experts, num_experts_per_tok=cfg.chosen_num_experts,
        hidden_act="gelu", router_jitter_noise=0.0, output_router_logits=False,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_peer(cfg: BluesConfig, device, dtype=None):
    """The Mixtral model on `device`, its parameters in `dtype` (default bf16: the benchmark's rows;
    time to quality trains float32 master weights under bf16 autocast, as Blues does)."""
    import torch
    from transformers import MixtralForCausalLM
    with torch.device(device):  # initialise on the device, directly in the parameters' dtype
        model = MixtralForCausalLM._from_config(peer_config(cfg), attn_implementation="sdpa",
                                                dtype=dtype or torch.bfloat16)
    return model


def describe(model, cfg: BluesConfig) -> str:
    n = sum(p.numel() for p in model.parameters())
    experts = getattr(model, "get_experts_implementation", lambda: {})()
    experts = ",".join(sorted(set(v for v in experts.values() if v))) if isinstance(experts, dict) else str(experts)
    return (f"{n / 1e6:.1f}M params (Blues {cfg.num_parameters() / 1e6:.1f}M); attn "
            f"{model.config._attn_implementation}; experts {experts or 'default'}")


def peer_train(wl: Workload, *, steps: int, warmup: int, compile: bool = False, seed: int = 0) -> Row:
    """compile: the whole model under `torch.compile(model)`, the one line a user would add."""
    reason = transformers_available()
    variant = "hf mixtral compile" if compile else "hf mixtral"
    if reason is not None:
        return Row(framework="peer", workload=wl.name, variant=variant, skipped=reason, config=wl.describe())
    import torch

    device = torch_device()
    if compile:
        fresh_torch_compile()
    torch.manual_seed(seed)
    mem = PeakMemory("torch", device)
    mem.reset()
    model = build_peer(wl.config, device)
    model.train()
    desc = describe(model, wl.config)
    log(f"  peer: {desc}")
    ids_np, _ = random_batch(wl.config, wl.batch, wl.seq, seed)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  fused=device.type == "cuda")
    params = list(model.parameters())
    forward = torch.compile(model) if compile else model
    losses = []

    def step():
        out = forward(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        return None

    times = time_steps(step, lambda _: torch_sync(device), warmup=warmup, steps=steps, reps=LOOP_REPS,
                       label=f"peer {wl.name} {variant}")
    reading = mem.read()
    values = [float(x) for x in torch.stack(losses).float().cpu()]
    ln_v = math.log(wl.config.vocab_size)
    init_ok = abs(values[0] - ln_v) < INIT_LOSS_TOL
    checks = [(init_ok, f"initial loss {values[0]:.3f} vs ln V {ln_v:.3f} (within {INIT_LOSS_TOL})"), loss_check(values)]
    del model, optimizer, losses, forward
    notes = f"{device.type}; {desc}"
    if compile and times.warmup_s:
        notes += f"; torch.compile(model), first step {times.warmup_s[0]:.1f} s"
    return _train_row("peer", wl, variant, times, reading, checks, "torch", notes)


def peer_decode(preset: str, *, quick: bool, steps: int, warmup: int, seed: int = 0,
                batches=None, static: tuple[bool, ...] = (False, True)) -> list[Row]:
    reason = transformers_available()
    prompt, new = (QUICK_PROMPT, QUICK_NEW) if quick else (PROMPT, NEW_TOKENS)
    batches = batches or (QUICK_BATCHES if quick else BATCHES)
    if reason is not None:
        return [Row(framework="peer", workload=f"decode b{b}", variant="hf generate", skipped=reason) for b in batches]
    import torch
    from transformers import GenerationConfig

    cfg = decode_config(preset, quick, prompt, new)
    device = torch_device()
    torch.manual_seed(seed)
    model = build_peer(cfg, device)
    model.eval()
    desc = describe(model, cfg)
    rows = []
    for batch in batches:
        prompts = torch.tensor(random_prompts(cfg, batch, prompt, seed + batch), device=device)  # [B, P]
        mask = torch.ones_like(prompts)
        # --quick: the static cache once (b1); on a CPU it is the slowest path and proves nothing more at b64
        for use_static in (static if not quick or batch == batches[0] else (False,)):
            variant = "hf generate static cache" if use_static else "hf generate"
            extra = {"cache_implementation": "static"} if use_static else {}

            def run(n_new):
                gc = GenerationConfig(max_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
                with torch.no_grad():
                    return model.generate(input_ids=prompts, attention_mask=mask, generation_config=gc)

            mem = PeakMemory("torch", device)
            mem.reset()
            # Warm-up: the dynamic cache has no length-dependent setup, so a short call warms it; the
            # static cache is sized (and maybe compiled) for prompt + new, so it warms at full length.
            for _ in range(warmup):
                run(new if use_static else min(new, 8))
            out = {}

            def call():
                out["ids"] = run(new)
                return None

            times = time_steps(call, lambda _: torch_sync(device), warmup=0, steps=steps,
                               label=f"peer decode b{batch} {'static' if use_static else 'dynamic'}")
            reading = mem.read()
            n_out = int(out["ids"].shape[1]) - prompt
            ok = n_out == new and int(out["ids"].shape[0]) == batch
            rows.append(Row(framework="peer", workload=f"decode b{batch}", variant=variant,
                            tokens_per_s=batch * new / times.median_s,
                            flops_per_token=decode_flops_per_token(cfg, prompt, new), dense_framework="torch",
                            step_ms=times.median_s * 1e3, spread=times.spread, peak_gib=reading.peak_gib,
                            peak_exact=reading.exact, check=f"{n_out}/{new} new tokens per row", check_ok=ok,
                            notes=f"{device.type}; prompt {prompt}, {new} new; {desc}",
                            config={"preset": preset, "batch": batch, "prompt": prompt, "new": new, "quick": quick}))
    del model
    return rows
