"""KV-cached generation and scoring for the JAX model (mirrors blues_torch/generation.py).

- `KVCache`: per-layer key/value buffers `[B, S, K, Dh]`, S = the model's context, a pytree so it
  can be a `jit` argument (donated), a `while_loop` carry and a result. Prompts are left-padded to end
  at the same slot; `start` (each row's first real slot) gives RoPE positions `slot - start` and the
  padding mask, so a prompt's output does not depend on the other prompts in its batch.
- `generate`: the whole generation is one compiled function: prefill in one pass, then
  `lax.while_loop` over chunks of `DECODE_CHUNK` decode steps (stopping when every row has emitted
  `<|endoftext|>` or the budget is spent), sampling on the device (greedy decoding of a 16-bit
  model on a GPU picks each token from the final hidden state in one fused head,
  blues_jax/greedy_head.py). XLA reads a `while_loop`'s
  condition back to the host on every iteration, but not a loop of known trip count's, so the steps
  of a chunk run with no host round trip and the stop test is read once a chunk. The cache buffers are
  donated in and handed back out, so one allocation serves every call of a batch size. Streaming
  (`on_token`) runs a compiled single step per token instead, since it must show each token.
- `sample`: the sampling specification of `blues/sampling.py`.
- `score`: per-token NLL and routing of a batch of windows, for perplexity.

The model reads the cache through `cache.positions(t)`, `cache.qkv[layer]`, `cache.attend(layer, q,
k, v, ...)` and `cache.advance(t)`, exactly as in torch. Inside a trace these calls replace the Python object's
arrays (functional updates: `dynamic_update_slice`), and the caller returns the object as a pytree.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blues.sampling import FMIX_C1, FMIX_C2, MASK32, ROW_MUL, STEP_MUL, TOKEN_MUL, SamplingParams, left_pad, prefill_width
from blues_jax import decode_attention, greedy_head
from blues_jax.attention import attention

# Decode steps between host reads of the stop test. A call computes up to DECODE_CHUNK - 1 steps past
# its budget (or past the step where every row finished) and drops them.
DECODE_CHUNK = 8


# ---- the cache -----------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class KVCache:
    """Per-layer key/value buffers for a left-padded batch (see the module doc)."""

    def __init__(self, k: list[jax.Array], v: list[jax.Array], index: jax.Array, start: jax.Array,
                 qkv: list[jax.Array]):
        self.k, self.v = list(k), list(v)  # L x [B, S, K, Dh]
        self.index = index  # int32 []: slots written so far (the same for every row)
        self.start = start  # int32 [B]: first real (non-padding) slot of each row
        self.qkv = list(qkv)  # L x [d, (H + 2K) Dh]: the layer's q, k, v weights side by side (load_qkv)
        self._slots: jax.Array | None = None  # [t] the slots the step in progress writes
        self._mask: jax.Array | None = None  # [B, t, S] its mask, built when attention first needs it

    def tree_flatten(self):
        return (tuple(self.k), tuple(self.v), self.index, self.start, tuple(self.qkv)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @classmethod
    def allocate(cls, config, batch: int, length: int, *, dtype=jnp.float32) -> "KVCache":
        shape = (batch, length, config.num_key_value_heads, config.head_dim)
        # Zeros: masked slots get probability exactly 0, and 0 * NaN would still be NaN.
        k = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
        width = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        qkv = [jnp.zeros((config.hidden_size, width), dtype) for _ in range(config.num_layers)]
        return cls(k, v, jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), qkv)

    def load_qkv(self, model) -> None:
        """Copy each layer's q, k and v weights side by side, so that a step projects with one GEMM
        instead of three (at decode sizes each GEMM costs its launch, not its arithmetic); the
        prefill does it, and the decode loop carries the copy."""
        self.qkv = [jnp.concatenate([layer.attn.q[...], layer.attn.k[...], layer.attn.v[...]], axis=1)
                    .astype(buf.dtype) for buf, layer in zip(self.qkv, model.layers)]

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def positions(self, t: int) -> jax.Array:
        """RoPE positions of the next t tokens, [B, t]; starts a step that writes them."""
        self._slots = self.index + jnp.arange(t, dtype=jnp.int32)  # [t] slots being written
        self._mask = None
        return jnp.maximum(self._slots[None, :] - self.start[:, None], 0)  # [B, t]

    def _step_mask(self) -> jax.Array:
        """The step's attention mask [B, t, S], built once a step and only where attention reads it."""
        if self._mask is None:
            slots = self._slots  # [t]
            keys = jnp.arange(self.length, dtype=jnp.int32)  # [S]
            causal = keys[None, :] <= slots[:, None]  # [t, S]
            real = keys[None, None, :] >= self.start[:, None, None]  # [B, 1, S] not a padding slot
            # A padding query attends to itself only, so no softmax row is empty.
            self._mask = causal[None] & (real | (keys[None, :] == slots[:, None])[None])  # [B, t, S]
        return self._mask

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Store k/v [B, t, K, Dh] at the step's slots; -> the layer's k, v [B, S, K, Dh]."""
        at = (0, self.index, 0, 0)
        self.k[layer] = jax.lax.dynamic_update_slice(self.k[layer], k.astype(self.k[layer].dtype), at)
        self.v[layer] = jax.lax.dynamic_update_slice(self.v[layer], v.astype(self.v[layer].dtype), at)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, softcap: float | None,
               impl: str) -> jax.Array:
        """Store k/v [B, t, K, Dh] (`update`) and attend q [B, t, H, Dh] over every cached slot under
        this step's mask -> [B, t, H, Dh]. A one-token step on a GPU runs one kernel that applies the
        mask's rule from `index` and `start` (blues_jax/decode_attention.py; no mask is built);
        otherwise `attention` with the mask (the `reference` implementation when asked for)."""
        k, v = self.update(layer, k, v)
        if impl != "reference" and decode_attention.applies(q):
            return decode_attention.decode_attention(q[:, 0], k, v, self.index, self.start, softcap)[:, None]
        return attention(q, k, v, softcap=softcap, impl=impl, mask=self._step_mask())

    def advance(self, t: int) -> None:
        self.index = self.index + t


# ---- sampling on the device ----------------------------------------------------------------------

def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(FMIX_C1)  # uint32 products wrap modulo 2^32, as the spec's
    h = h ^ (h >> 13)
    h = h * jnp.uint32(FMIX_C2)
    return h ^ (h >> 16)


def row_keys(seed: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
    """Mirror of blues.sampling.row_keys: [B] uint32."""
    s = _fmix32(jnp.asarray(seed, jnp.uint32))
    s = _fmix32(s ^ (jnp.asarray(step).astype(jnp.uint32) * jnp.uint32(STEP_MUL)))
    return _fmix32(s ^ (rows.astype(jnp.uint32) * jnp.uint32(ROW_MUL)))


def uniforms(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Mirror of blues.sampling.uniform_bits: keys [B], ids [B, N] -> u in (0, 1) float32 [B, N]."""
    h = _fmix32(keys[:, None] ^ (ids.astype(jnp.uint32) * jnp.uint32(TOKEN_MUL)))  # [B, N]
    return ((h >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)


def filter_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Steps 1-3 of the spec: logits [B, V] -> (candidate logits [B, C], ids [B, C]) in rank order;
    rejected candidates hold -inf. Greedy is handled by `sample`."""
    z = logits.astype(jnp.float32) / params.temperature  # [B, V]
    b, vocab = z.shape
    iota = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (b, vocab))  # [B, V]
    k = params.active_top_k(vocab)
    if k:
        # lax.top_k puts the lower index first among equal values: exactly the spec's rank order,
        # so ties at the k-th value go to the lower ids.
        vals, ids = jax.lax.top_k(z, k)  # [B, k]
        ids = ids.astype(jnp.int32)
    elif params.active_top_p:
        neg, ids = jax.lax.sort((-z, iota), dimension=-1, num_keys=2)  # [B, V]
        vals = -neg
    else:
        vals, ids = z, iota
    if params.active_top_p:
        probs = jax.nn.softmax(vals, axis=-1)  # [B, C]
        cum = jnp.cumsum(probs, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)  # [B, C] mass ranked ahead
        vals = jnp.where(before >= params.top_p, -jnp.inf, vals)  # rank 0 has 0 < p: always kept
    return vals, ids


def sample(logits: jax.Array, params: SamplingParams, step: jax.Array, rows: jax.Array,
           seed: jax.Array | None = None) -> jax.Array:
    """The next token of each row: logits [B, V] -> ids [B] (int32). `seed` (uint32 []) overrides
    params.seed, so one compiled function serves every seed."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first maximum: ties to the lower id
    vals, ids = filter_logits(logits, params)  # [B, C]
    seed = jnp.uint32(params.seed & MASK32) if seed is None else seed
    g = -jnp.log(-jnp.log(uniforms(row_keys(seed, step, rows), ids)))  # [B, C] Gumbel noise
    pick = jnp.argmax(vals + g, axis=-1)  # [B]
    return jnp.take_along_axis(ids, pick[:, None], axis=1)[:, 0]  # [B]


# ---- generation ----------------------------------------------------------------------------------

def _next_tokens(model, ids, cache, step, rows, seed, params: SamplingParams, fused_head: bool):
    """ids [B, t] through the model into the cache -> the next token of each row, [B] int32. Greedy
    decoding of a 16-bit model on a GPU takes it straight from the final hidden state
    (blues_jax/greedy_head.py): the [B, V] logits are never written."""
    fused = fused_head and params.greedy and greedy_head.fused_applies(model.dtype, model.config.hidden_size)
    out = model(ids, cache=cache, return_logits=not fused)
    if fused:
        return greedy_head.greedy_tokens(out.hidden[:, -1], model.embed[...], model.config.vocab_size)
    return sample(out.logits[:, -1], params, step, rows, seed)  # [B, V] -> [B]


def _emit(nxt, step, finished, out_ids, eot_id, stop_at_eot):
    """Record the tokens nxt [B] in column `step` of out_ids; -> (token [B], finished, out_ids).
    `eot_id` and `stop_at_eot` are traced values: one compiled function serves every setting."""
    nxt = jnp.where(stop_at_eot & finished, eot_id, nxt)  # a finished row only repeats <|endoftext|>
    finished = finished | (nxt == eot_id)
    out_ids = jax.lax.dynamic_update_slice(out_ids, nxt[:, None], (0, step))
    return nxt, finished, out_ids


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, params: SamplingParams, fused_head: bool):
    """(generate_all, prefill, step) for one model structure and sampling setting, jitted."""

    def prefill(state, ids, start, rows, seed, eot_id, stop_at_eot, cache):
        model = nnx.merge(graphdef, state)
        b = ids.shape[0]
        cache.index, cache.start = jnp.zeros((), jnp.int32), start
        cache.load_qkv(model)
        nxt = _next_tokens(model, ids, cache, 0, rows, seed, params, fused_head)  # [B]
        out_ids = jnp.full((b, cache.length), eot_id, jnp.int32)  # [B, S]: room for any budget
        tok, finished, out_ids = _emit(nxt, 0, jnp.zeros((b,), bool), out_ids, eot_id, stop_at_eot)
        return tok, finished, out_ids, cache

    def step(state, tok, step_i, finished, out_ids, rows, seed, eot_id, stop_at_eot, cache):
        model = nnx.merge(graphdef, state)
        nxt = _next_tokens(model, tok[:, None], cache, step_i, rows, seed, params, fused_head)  # [B]
        tok, finished, out_ids = _emit(nxt, step_i, finished, out_ids, eot_id, stop_at_eot)
        return tok, finished, out_ids, cache

    def generate_all(state, ids, start, rows, seed, eot_id, stop_at_eot, max_new, cache):
        tok, finished, out_ids, cache = prefill(state, ids, start, rows, seed, eot_id, stop_at_eot, cache)

        def cond(carry):
            i, _, finished, _, _ = carry
            return (i < max_new) & ~(stop_at_eot & jnp.all(finished))

        def body(carry):
            i, tok, finished, out_ids, cache = carry

            def one(j, decoding):  # a step past the budget writes a cache slot and a column never read
                tok, finished, out_ids, cache = decoding
                return step(state, tok, i + j, finished, out_ids, rows, seed, eot_id, stop_at_eot, cache)

            decoding = jax.lax.fori_loop(0, DECODE_CHUNK, one, (tok, finished, out_ids, cache))
            return (i + DECODE_CHUNK, *decoding)

        done, _, _, out_ids, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, finished, out_ids, cache))
        return out_ids, jnp.minimum(done, max_new), cache

    return (jax.jit(generate_all, donate_argnames="cache"), jax.jit(prefill, donate_argnames="cache"),
            jax.jit(step, donate_argnames=("out_ids", "cache")))


_CACHES: dict = {}


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams, *,
             eot_id: int, stop_at_eot: bool = True,
             on_token: Callable[[int, np.ndarray], None] | None = None, row_offset: int = 0,
             fused_head: bool = True) -> list[list[int]]:
    """New token ids for each prompt (each a non-empty id list; the caller checks lengths).

    Rows stop at `<|endoftext|>` (not included) when `stop_at_eot`. `on_token(step, ids [B])` is
    called after every step (streaming: one host read per token). Row b draws its random numbers as
    sample `row_offset + b` (so splitting a request into batches changes nothing). `fused_head` False:
    greedy tokens from the logits' argmax even where the fused head applies (the reference the
    benchmark's check holds it to).
    """
    cfg = model.config
    context = cfg.max_position_embeddings
    was_deterministic = model.deterministic
    model.eval()
    try:
        graphdef, state = nnx.split(model)
        ids, start = left_pad(prompts, eot_id, prefill_width(prompts, max_new_tokens, context), dtype=np.int32)
        batch = ids.shape[0]
        generate_all, prefill, step = _compiled(graphdef, dataclasses.replace(params, seed=0), fused_head)
        # Reuse the last call's buffers for the same batch size, dtype and model config (they are donated
        # and returned).
        key = (batch, jnp.dtype(model.dtype), cfg)
        cache = _CACHES.pop(key, None)
        if cache is None:
            _CACHES.clear()
            cache = KVCache.allocate(cfg, batch, context, dtype=model.dtype)
        seed = jnp.uint32(params.seed & MASK32)
        rows = jnp.arange(batch, dtype=jnp.int32) + row_offset
        eot, stop = jnp.int32(eot_id), jnp.bool_(stop_at_eot)
        if on_token is None:
            out_ids, done, cache = generate_all(state, jnp.asarray(ids), jnp.asarray(start), rows, seed, eot, stop,
                                                jnp.int32(max_new_tokens), cache)
            done = int(done)
        else:
            tok, finished, out_ids, cache = prefill(state, jnp.asarray(ids), jnp.asarray(start), rows, seed, eot,
                                                    stop, cache)
            on_token(0, np.asarray(tok))
            done = 1
            while done < max_new_tokens and not (stop_at_eot and bool(jnp.all(finished))):
                tok, finished, out_ids, cache = step(state, tok, jnp.int32(done), finished, out_ids, rows, seed,
                                                     eot, stop, cache)
                on_token(done, np.asarray(tok))
                done += 1
        _CACHES[key] = cache
        out = np.asarray(out_ids)[:, :done]
    finally:
        if not was_deterministic:
            model.train()
    return [_until_eot(row, eot_id) if stop_at_eot else row.tolist() for row in out]


def _until_eot(row: np.ndarray, eot_id: int) -> list[int]:
    hits = np.flatnonzero(row == eot_id)
    return row[:hits[0]].tolist() if hits.size else row.tolist()


# ---- scoring (perplexity and routing) ------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _score_fn(graphdef):
    @jax.jit
    def run(state, ids, targets):
        model = nnx.merge(graphdef, state)
        out = model(ids)
        logits = out.logits.astype(jnp.float32)  # [B, T, V]
        valid = targets != -100
        picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]  # [B, T]
        nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)  # [B, T]
        probs = out.router_probs.astype(jnp.float32)  # [L, B, T, E]
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
        return nll, out.expert_indices, entropy  # [B, T], [L, B, T, k], [L, B, T]
    return run


def score(model, input_ids: np.ndarray, targets: np.ndarray):
    """Per-token NLL and routing of a batch of windows (plain forward, no cache); numpy results:
    nll [B, T] float32 (0 where targets are -100), expert_indices [L, B, T, k], router_entropy [L, B, T]."""
    was_deterministic = model.deterministic
    model.eval()
    try:
        graphdef, state = nnx.split(model)
        nll, idx, ent = _score_fn(graphdef)(state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(targets, jnp.int32))
        return np.asarray(nll), np.asarray(idx), np.asarray(ent)
    finally:
        if not was_deterministic:
            model.train()


@functools.lru_cache(maxsize=8)
def _forward_fn(graphdef):
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)


def plain_logits(model, input_ids: np.ndarray) -> np.ndarray:
    """Full-forward logits [B, T, V] as float32 numpy (tests compare the cache against this)."""
    was_deterministic = model.deterministic
    model.eval()
    try:
        graphdef, state = nnx.split(model)
        return np.asarray(_forward_fn(graphdef)(state, jnp.asarray(input_ids, jnp.int32)), dtype=np.float32)
    finally:
        if not was_deterministic:
            model.train()
