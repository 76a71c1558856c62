"""KV-cached generation and scoring for the PyTorch model.

- `KVCache`: static, pre-allocated key/value buffers, one pair per layer, `[B, S, K, Dh]`, S = the
  model's context. Prompts are left-padded so they all end at the same slot: one write index serves
  the whole batch, and each row's first real slot (`start`) gives its RoPE positions
  (`slot - start`) and its padding mask. A prompt's tokens therefore get the positions, keys and
  values they would get alone: its output does not depend on the other prompts in the batch.
- `generate`: one prefill pass over the padded prompts, then a decode loop of one token per step.
  Every step has the same shapes and no host synchronisation (the sampler is on the device, the
  stop test is read only every `STOP_CHECK_EVERY` steps; greedy decoding of a 16-bit model on a
  GPU picks each token from the final hidden state in one fused head, blues_torch/greedy_head.py), so on a GPU the step is captured once in
  a CUDA graph and replayed (optionally torch.compile'd first); a step that cannot be captured falls
  back, with a warning, to eager. On CUDA the experts of a decode-sized block run sync-free
  (blues_torch/experts.py, SMALL_BLOCK_ROWS), so a float32 step captures too.
- `sample`: the sampling specification of `blues/sampling.py`, on the device.
- `score`: per-token NLL and routing of a batch of windows, for perplexity (`generate.py`).

The model reads the cache through three calls and one field (mirrored in blues_jax/generation.py):
`cache.positions(t)` (RoPE positions of the t new tokens, [B, t]; starts the step),
`cache.qkv[layer]` (the layer's q, k, v weights side by side, `load_qkv`: one projection GEMM),
`cache.attend(layer, q, k, v, ...)` (store k/v and attend over the layer's cached slots under the
step's mask) and `cache.advance(t)` after the last layer.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blues.sampling import FMIX_C1, FMIX_C2, MASK32, ROW_MUL, STEP_MUL, TOKEN_MUL, SamplingParams, left_pad, prefill_width
from blues_torch import decode_attention, greedy_head
from blues_torch.attention import attention

logger = logging.getLogger("blues")

STOP_CHECK_EVERY = 16  # decode steps between host reads of "have all rows emitted <|endoftext|>?"


# ---- the cache -----------------------------------------------------------------------------------

class KVCache:
    """Per-layer key/value buffers for a left-padded batch (see the module doc)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], index: torch.Tensor, start: torch.Tensor,
                 qkv: list[torch.Tensor]):
        self.k, self.v = k, v  # L x [B, S, K, Dh]
        self.index = index  # int64 []: slots written so far (the same for every row)
        self.start = start  # int64 [B]: first real (non-padding) slot of each row
        self.qkv = qkv  # L x [d, (H + 2K) Dh]: the layer's q, k, v weights side by side (load_qkv)
        self._slots: torch.Tensor | None = None  # [t] the slots the step in progress writes
        self._mask: torch.Tensor | None = None  # [B, t, S] its mask, built when attention first needs it

    @classmethod
    def allocate(cls, config, batch: int, length: int, *, device, dtype=torch.float32) -> "KVCache":
        shape = (batch, length, config.num_key_value_heads, config.head_dim)
        # Zeros, not empty: masked slots get probability exactly 0, and 0 * NaN would still be NaN.
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        width = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        qkv = [torch.zeros(config.hidden_size, width, device=device, dtype=dtype) for _ in range(config.num_layers)]
        return cls(k, v, torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device), qkv)

    def load_qkv(self, model) -> None:
        """Copy each layer's q, k and v weights side by side, so that a step projects with one GEMM
        instead of three (at decode sizes each GEMM costs its launch, not its arithmetic). In place:
        a captured graph keeps reading the same buffers; every `generate` calls it, so the copy
        follows the model's weights as training goes on."""
        for buf, layer in zip(self.qkv, model.layers):
            torch.cat([layer.attn.q, layer.attn.k, layer.attn.v], dim=1, out=buf)

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def reset(self, start: torch.Tensor) -> None:
        """Reuse the buffers for a new batch (in place, so a captured CUDA graph stays valid)."""
        self.index.zero_()
        self.start.copy_(start)

    def positions(self, t: int) -> torch.Tensor:
        """RoPE positions of the next t tokens, [B, t]; starts a step that writes them."""
        self._slots = self.index + torch.arange(t, device=self.index.device)  # [t] slots being written
        self._mask = None
        return (self._slots[None, :] - self.start[:, None]).clamp(min=0)  # [B, t]

    def _step_mask(self) -> torch.Tensor:
        """The step's attention mask [B, t, S], built once a step and only where attention reads it."""
        if self._mask is None:
            slots = self._slots  # [t]
            keys = torch.arange(self.length, device=slots.device)  # [S]
            causal = keys[None, :] <= slots[:, None]  # [t, S]
            real = keys[None, None, :] >= self.start[:, None, None]  # [B, 1, S] not a padding slot
            # A padding query attends to itself only (finite garbage that no real query ever reads),
            # so no softmax row is empty.
            self._mask = causal[None] & (real | (keys[None, :] == slots[:, None])[None])  # [B, t, S]
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, t, K, Dh] at the step's slots; -> the layer's k, v [B, S, K, Dh]."""
        self.k[layer].index_copy_(1, self._slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(1, self._slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softcap: float | None,
               impl: str) -> torch.Tensor:
        """Store k/v [B, t, K, Dh] (`update`) and attend q [B, t, H, Dh] over every cached slot under
        this step's mask -> [B, t, H, Dh]. A one-token step on a GPU runs one kernel that applies the
        mask's rule from `index` and `start` (blues_torch/decode_attention.py; no mask is built);
        otherwise `attention` with the mask (the `reference` implementation when asked for)."""
        k, v = self.update(layer, k, v)
        if impl != "reference" and decode_attention.applies(q):
            return decode_attention.decode_attention(q[:, 0], k, v, self.index, self.start, softcap)[:, None]
        return attention(q, k, v, softcap=softcap, impl=impl, mask=self._step_mask())

    def advance(self, t: int) -> None:
        self.index += t


# ---- sampling on the device ----------------------------------------------------------------------

def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # uint32 arithmetic in int64: products of two 32-bit values wrap modulo 2^64, and the mask
    # keeps the low 32 bits, which is exactly the uint32 product.
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & MASK32
    return h ^ (h >> 16)


def row_keys(seed: int | torch.Tensor, step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mirror of blues.sampling.row_keys: [B] int64 holding uint32 values."""
    s = _fmix32((torch.zeros_like(rows) + seed) & MASK32)
    s = _fmix32(s ^ ((step * STEP_MUL) & MASK32))
    return _fmix32(s ^ ((rows * ROW_MUL) & MASK32))


def uniforms(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mirror of blues.sampling.uniform_bits: keys [B], ids [B, N] -> u in (0, 1) float32 [B, N]."""
    h = _fmix32(keys[:, None] ^ ((ids * TOKEN_MUL) & MASK32))  # [B, N]
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def _rank_keys(z: torch.Tensor) -> torch.Tensor:
    """int64 keys that order tokens exactly as the spec ranks them: logit descending, then id
    ascending. z [B, V] float32 -> [B, V] int64, all distinct (torch.topk orders ties arbitrarily)."""
    bits = z.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as int order
    ids = torch.arange(z.shape[-1], device=z.device, dtype=torch.int64)
    return (ordered << 32) | (0x7FFFFFFF - ids)  # low half: a smaller id is a larger key


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the spec: logits [B, V] -> (candidate logits [B, C], their ids [B, C]) in rank
    order; rejected candidates hold -inf. Greedy is handled by `sample`."""
    z = logits.float() / params.temperature  # [B, V]
    b, vocab = z.shape
    k = params.active_top_k(vocab)
    if k:
        # One top-k over distinct keys: exactly k kept, ties at the k-th value to the lower ids.
        ids = torch.topk(_rank_keys(z), k, dim=-1).indices  # [B, k] in rank order
        vals = z.gather(1, ids)  # [B, k]
    elif params.active_top_p:
        vals, ids = z.sort(dim=-1, descending=True, stable=True)  # [B, V]; stable: ties by id
    else:
        vals, ids = z, torch.arange(vocab, device=z.device).expand(b, vocab)
    if params.active_top_p:
        probs = vals.softmax(dim=-1)  # [B, C]
        cum = torch.cumsum(probs, dim=-1)  # [B, C]
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # [B, C] mass ranked ahead
        vals = vals.masked_fill(before >= params.top_p, float("-inf"))  # rank 0 has 0 < p: always kept
    return vals, ids


ARGMAX_BLOCK = 128  # columns per block of greedy_argmax's first stage


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64, the first maximum of each row (ties to the lower id), exactly
    logits.argmax(-1). In two stages, the maximum of each block of ARGMAX_BLOCK columns and then
    the first block holding the row's maximum: one row of 200k columns is otherwise a single serial
    reduction (~40 us of a ~400 us batch-1 decode step on an H200)."""
    b, v = logits.shape
    padded = F.pad(logits, (0, -v % ARGMAX_BLOCK), value=float("-inf"))  # [B, V']
    block_max, block_arg = padded.view(b, -1, ARGMAX_BLOCK).max(dim=-1)  # [B, V'/blk] each; first max in block
    block = block_max.argmax(dim=-1, keepdim=True)  # [B, 1] the first block holding the row maximum
    return (block * ARGMAX_BLOCK + block_arg.gather(1, block)).squeeze(1)  # [B]


def sample(logits: torch.Tensor, params: SamplingParams, step: torch.Tensor, rows: torch.Tensor,
           seed: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row: logits [B, V] -> ids [B] (int64). `step` int64 [] on the device;
    `seed` (int64 [] on the device) overrides params.seed, so a captured graph serves every seed."""
    if params.greedy:
        return greedy_argmax(logits)
    vals, ids = filter_logits(logits, params)  # [B, C]
    keys = row_keys(params.seed if seed is None else seed, step, rows)  # [B]
    g = -torch.log(-torch.log(uniforms(keys, ids)))  # [B, C] Gumbel noise
    return ids.gather(1, (vals + g).argmax(dim=-1, keepdim=True)).squeeze(1)  # [B]


# ---- generation ----------------------------------------------------------------------------------

class _Decoder:
    """The state of one batch shape: cache, token buffers and (on CUDA) the captured decode step."""

    def __init__(self, model, batch: int, max_new: int, params: SamplingParams, eot_id: int, stop_at_eot: bool,
                 compile: bool = False, fused_head: bool = True):
        cfg = model.config
        device = model.embed.device
        self.model, self.params, self.eot_id, self.stop_at_eot = model, params, eot_id, stop_at_eot
        # Greedy decoding of a 16-bit model on a GPU takes each token straight from the final hidden
        # state (blues_torch/greedy_head.py): the [B, V] logits are never written.
        self.fused_head = fused_head and params.greedy and greedy_head.fused_applies(model.embed)
        # The cache spans the whole context, whatever this call's lengths: one static shape per batch
        # size, so a captured graph serves every later call of that size.
        self.cache = KVCache.allocate(cfg, batch, cfg.max_position_embeddings, device=device, dtype=model.embed.dtype)
        self.rows = torch.arange(batch, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # sampling step of the next token
        self.seed = torch.zeros((), dtype=torch.int64, device=device)  # set per call: not baked in a graph
        self.token = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # [B, 1] last sampled
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new), eot_id, dtype=torch.int64, device=device)  # [B, max_new]
        self.graph: torch.cuda.CUDAGraph | None = None
        # torch.compile fuses the step's many small kernels (norms, RoPE, routing, sampling) into
        # few; the compiled step is then captured like the eager one. The prefill is compiled too
        # (one graph per padded prompt length: prompts are bucketed, blues.sampling.prefill_width).
        self.step_fn = torch.compile(self.decode_step, dynamic=False) if compile else self.decode_step
        self.prefill_fn = torch.compile(self.prefill, dynamic=False) if compile else self.prefill

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, t] through the model into the cache -> the next token of each row, [B] int64."""
        out = self.model(ids, cache=self.cache, return_logits=not self.fused_head)
        if self.fused_head:
            return greedy_head.greedy_tokens(out.hidden[:, -1], self.model.embed, self.model.config.vocab_size)
        return sample(out.logits[:, -1], self.params, self.step, self.rows, self.seed)  # [B, V] -> [B]

    def emit(self, nxt: torch.Tensor) -> None:
        """Record the tokens nxt [B] at column `step` and advance (all on the device)."""
        if self.stop_at_eot:
            nxt = torch.where(self.finished, self.eot_id, nxt)
            self.finished |= nxt == self.eot_id
        self.out.index_copy_(1, self.step.clamp(max=self.out.shape[1] - 1).view(1), nxt[:, None])
        self.token.copy_(nxt[:, None])
        self.step += 1

    def prefill(self, ids: torch.Tensor) -> None:
        """Run the padded prompts ids [B, P] through the model into the cache and emit the first token."""
        self.emit(self.forward(ids))

    def decode_step(self) -> None:
        self.emit(self.forward(self.token))

    def capture(self) -> bool:
        """Capture `decode_step` in a CUDA graph; False (and eager decoding) if it cannot be."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: compilation, lazy inits and allocator pools, outside the graph
                    self.step_fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step_fn()
            self.graph = graph
            return True
        except Exception as e:  # e.g. a layer that synchronises with the host
            logger.warning("decode step could not be captured in a CUDA graph (%s); decoding eagerly",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            torch.cuda.synchronize()
            self.step_fn = self.decode_step
            return False


_DECODERS: dict = {}


def _decoder(model, batch: int, max_new: int, params: SamplingParams, eot_id: int, stop_at_eot: bool,
             cuda_graphs: bool, compile: bool, fused_head: bool) -> _Decoder:
    # One decoder per (model, shape, settings); the output buffer is sized for the context, so any
    # max_new of a later call fits.
    context = model.config.max_position_embeddings
    key = (id(model), batch, dataclasses.replace(params, seed=0), eot_id, stop_at_eot, cuda_graphs, compile, fused_head)
    dec = _DECODERS.get(key)
    if dec is None or dec.model is not model:
        dec = _Decoder(model, batch, context, params, eot_id, stop_at_eot, compile, fused_head)
        if cuda_graphs:
            dec.capture()  # on failure: a warning, and eager steps
        _DECODERS.clear()  # one live decoder at a time: each holds a full-context cache
        _DECODERS[key] = dec
    return dec


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams, *,
             eot_id: int, stop_at_eot: bool = True, on_token: Callable[[int, np.ndarray], None] | None = None,
             row_offset: int = 0, cuda_graphs: bool | None = None, compile: bool = False,
             fused_head: bool = True) -> list[list[int]]:
    """New token ids for each prompt (each prompt a non-empty id list; the caller checks lengths).

    Rows stop at `<|endoftext|>` (not included) when `stop_at_eot`. `on_token(step, ids [B])` is
    called after every step (it forces a host sync per token: streaming only). Row b draws its
    random numbers as sample `row_offset + b` (so splitting a request into batches changes nothing).
    `cuda_graphs`: capture the decode step (None = when the model is on a CUDA device); `compile`:
    torch.compile it first (a one-time cost of tens of seconds for a faster step); `fused_head`
    False: greedy tokens from the logits' argmax even where the fused head applies (the reference
    the benchmark's check holds it to).
    """
    was_training = model.training
    model.eval()
    try:
        device = model.embed.device
        cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        ids, start = left_pad(prompts, eot_id, prefill_width(prompts, max_new_tokens, model.config.max_position_embeddings))
        batch, _ = ids.shape
        dec = _decoder(model, batch, max_new_tokens, params, eot_id, stop_at_eot, cuda_graphs, compile, fused_head)
        dec.cache.reset(torch.from_numpy(start).to(device))
        dec.cache.load_qkv(model)
        dec.step.zero_()
        dec.rows.copy_(torch.arange(batch, device=device) + row_offset)
        dec.seed.fill_(params.seed & 0xFFFFFFFF)
        dec.finished.zero_()
        dec.out.fill_(eot_id)

        dec.prefill_fn(torch.from_numpy(ids).to(device))
        done = 1
        if on_token is not None:
            on_token(0, dec.token[:, 0].cpu().numpy())
        while done < max_new_tokens:
            if stop_at_eot and done % STOP_CHECK_EVERY == 0 and bool(dec.finished.all()):
                break
            if dec.graph is not None:
                dec.graph.replay()
            else:
                dec.step_fn()
            if on_token is not None:
                on_token(done, dec.token[:, 0].cpu().numpy())
            done += 1
        out = dec.out[:, :done].cpu().numpy()
    finally:
        model.train(was_training)
    return [_until_eot(row, eot_id) if stop_at_eot else row.tolist() for row in out]


def _until_eot(row: np.ndarray, eot_id: int) -> list[int]:
    hits = np.flatnonzero(row == eot_id)
    return row[:hits[0]].tolist() if hits.size else row.tolist()


# ---- scoring (perplexity and routing) ------------------------------------------------------------

@torch.no_grad()
def score(model, input_ids: np.ndarray, targets: np.ndarray):
    """Per-token NLL and routing of a batch of windows (plain forward, no cache).

    input_ids, targets [B, T] int (targets -100 = not scored). Returns numpy arrays: nll [B, T]
    float32 (0 where not scored), expert_indices [L, B, T, k], router_entropy [L, B, T] (nats).
    """
    was_training = model.training
    model.eval()
    try:
        device = model.embed.device
        ids = torch.as_tensor(input_ids, dtype=torch.int64, device=device)
        tgt = torch.as_tensor(targets, dtype=torch.int64, device=device)
        with torch.no_grad():
            out = model(ids)
            logits = out.logits.float()  # [B, T, V], a view of the padded head's output
            valid = tgt != -100
            picked = logits.gather(-1, torch.where(valid, tgt, 0).unsqueeze(-1)).squeeze(-1)  # [B, T]
            # log-sum-exp in place on the view: no contiguous copy, no log-softmax tensor (CPU memory
            # traffic is most of the cost after the head's GEMM)
            top = logits.amax(-1, keepdim=True)  # [B, T, 1]
            lse = top.squeeze(-1) + logits.sub_(top).exp_().sum(-1).log()  # [B, T]
            nll = torch.where(valid, lse - picked, 0.0)  # [B, T]
            probs = out.router_probs.float()  # [L, B, T, E]
            entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [L, B, T]
        return nll.cpu().numpy(), out.expert_indices.cpu().numpy(), entropy.cpu().numpy()
    finally:
        model.train(was_training)


def plain_logits(model, input_ids: np.ndarray) -> np.ndarray:
    """Full-forward logits [B, T, V] as float32 numpy (tests compare the cache against this)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.as_tensor(input_ids, dtype=torch.int64, device=model.embed.device)
            return model(ids).logits.float().cpu().numpy()
    finally:
        model.train(was_training)
