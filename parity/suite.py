"""What the parity checks measure, shared by `python -m parity.check` and tests/test_parity.py.

`run_torch` / `run_jax` run one eval-mode forward (no router noise, no dropout) of a model of either
framework and return plain numpy results (`Outputs`), optionally with every block's output hidden
state; `compare` turns two of them into the numbers the checks judge (`Comparison`): logit
differences, per-token KL divergence, routing agreement, router-probability and loss differences,
per layer where that means something. `torch_grads` / `jax_grads` give d(loss)/d(parameter) by
canonical name. Nothing here decides pass or fail: callers hold the tolerances.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np

from blues.layout import canonical_layout


@dataclass
class Outputs:
    """One forward pass, as numpy (logits float32 [B, T, V])."""

    logits: np.ndarray
    expert_indices: np.ndarray  # [L, B, T, k]
    router_probs: np.ndarray  # [L, B, T, E]
    aux_loss: float
    z_loss: float
    lm_loss: float | None = None  # with targets
    loss: float | None = None
    dropped: np.ndarray | None = None  # [L] assignments refused by capacity
    hidden: list[np.ndarray] = field(default_factory=list)  # every block's output [B, T, d] (if asked)
    moe_inputs: list[np.ndarray] = field(default_factory=list)  # every MoE layer's input [B, T, d] (if asked)


# ---- running a model -------------------------------------------------------------------------------

def run_torch(model, ids: np.ndarray, targets: np.ndarray | None = None, *, hidden: bool = False,
              autocast_dtype=None) -> Outputs:
    """Eval-mode forward of a blues_torch model (on its device); `autocast_dtype` e.g. torch.bfloat16.
    `hidden`: also record every block's output and every MoE layer's input (forward hooks)."""
    import torch

    device = model.embed.device
    blocks: list = []
    moe_in: list = []
    hooks = []
    if hidden:
        for layer in model.layers:
            hooks.append(layer.register_forward_hook(lambda _m, _i, out: blocks.append(out[0].detach())))
            hooks.append(layer.moe.register_forward_hook(lambda _m, inp, _o: moe_in.append(inp[0].detach())))
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            x = torch.as_tensor(ids, dtype=torch.int64, device=device)  # [B, T]
            y = None if targets is None else torch.as_tensor(targets, dtype=torch.int64, device=device)
            out = model(x, y)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    f = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    return Outputs(logits=f(out.logits), expert_indices=out.expert_indices.cpu().numpy(),
                   router_probs=f(out.router_probs), aux_loss=float(out.aux_loss), z_loss=float(out.z_loss),
                   lm_loss=None if out.lm_loss is None else float(out.lm_loss),
                   loss=None if out.loss is None else float(out.loss), dropped=out.dropped.cpu().numpy(),
                   hidden=[f(h) for h in blocks], moe_inputs=[f(h) for h in moe_in])


@contextlib.contextmanager
def _capture_jax_blocks(blocks: list, moe_in: list):
    """Record every blues_jax Block's output and MoE input while inside (at trace time under jit).

    NNX has no forward hooks; wrapping the classes' __call__ for the duration of one trace is the
    smallest equivalent, and it is undone on exit whatever happens. The blocks are traced inline
    meanwhile (`blocks_traced_inline`), so each layer's values are recorded from the model's trace.
    """
    from blues_jax.model import Block, MoE, blocks_traced_inline

    block_call, moe_call = Block.__call__, MoE.__call__

    def block(self, *args, **kwargs):
        out = block_call(self, *args, **kwargs)
        blocks.append(out[0])
        return out

    def moe(self, x, *args, **kwargs):
        moe_in.append(x)
        return moe_call(self, x, *args, **kwargs)

    Block.__call__, MoE.__call__ = block, moe
    try:
        with blocks_traced_inline():
            yield
    finally:
        Block.__call__, MoE.__call__ = block_call, moe_call


@functools.cache
def _jax_fns():
    """The jitted JAX entry points (built once; NNX caches one compilation per model structure)."""
    from flax import nnx

    def forward(model, ids, targets, hidden):
        blocks, moe_in = [], []
        with _capture_jax_blocks(blocks, moe_in) if hidden else contextlib.nullcontext():
            out = model(ids, targets)
        return out, blocks, moe_in

    def grads(model, ids, targets, hidden):
        def loss(m):
            out, blocks, moe_in = forward(m, ids, targets, hidden)
            return out.loss, (out, blocks, moe_in)

        return nnx.value_and_grad(loss, has_aux=True)(model)

    def routers(model, xs):
        """Each layer's router on given inputs xs [L, B, T, d]: (probs [L, B, T, E], indices [L, B, T, k])."""
        stats = [layer.moe(xs[i])[1] for i, layer in enumerate(model.layers)]
        return [s.probs for s in stats], [s.indices for s in stats]

    return (nnx.jit(forward, static_argnames="hidden"), nnx.jit(grads, static_argnames="hidden"), nnx.jit(routers))


def run_jax(model, ids: np.ndarray, targets: np.ndarray | None = None, *, hidden: bool = False) -> Outputs:
    """Eval-mode forward of a blues_jax model (jitted; its compute dtype is the model's `dtype`).
    `hidden`: also return every block's output and every MoE layer's input."""
    import jax.numpy as jnp

    forward = _jax_fns()[0]
    with _eval(model):
        out, blocks, moe_in = forward(model, jnp.asarray(ids, jnp.int32),
                                      None if targets is None else jnp.asarray(targets, jnp.int32), hidden=hidden)
    return _jax_outputs(out, blocks, moe_in)


@contextlib.contextmanager
def _eval(model):
    was_deterministic = model.deterministic
    model.eval()
    try:
        yield
    finally:
        if not was_deterministic:
            model.train()


def _jax_outputs(out, blocks, moe_in) -> Outputs:
    f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return Outputs(logits=f(out.logits), expert_indices=np.asarray(out.expert_indices),
                   router_probs=f(out.router_probs), aux_loss=float(out.aux_loss), z_loss=float(out.z_loss),
                   lm_loss=None if out.lm_loss is None else float(out.lm_loss),
                   loss=None if out.loss is None else float(out.loss), dropped=np.asarray(out.dropped),
                   hidden=[f(h) for h in blocks], moe_inputs=[f(h) for h in moe_in])


def jax_routers(model, moe_inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's router applied to the given MoE inputs (eval mode): probs [L, B, T, E] and
    chosen experts [L, B, T, k]. Feeding both frameworks the same inputs isolates the routing math
    from the float32 rounding the earlier layers accumulate."""
    import jax.numpy as jnp

    routers = _jax_fns()[2]
    with _eval(model):
        probs, idx = routers(model, jnp.asarray(np.stack(moe_inputs)))
    return np.stack([np.asarray(p, np.float32) for p in probs]), np.stack([np.asarray(i) for i in idx])


def torch_grads(model, ids: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """(total loss, d loss / d parameter by canonical name), eval mode (deterministic), float32.
    The gradients stay in the parameters' .grad too (an optimizer step can follow)."""
    import torch

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        out = model(torch.as_tensor(ids, dtype=torch.int64, device=model.embed.device),
                    torch.as_tensor(targets, dtype=torch.int64, device=model.embed.device))
        out.loss.backward()
    finally:
        model.train(was_training)
    grads = {}
    for spec in canonical_layout(model.config):
        g = model.get_parameter(spec.path).grad
        grads[spec.name] = (np.zeros(spec.shape, np.float32) if g is None
                            else g.detach().float().cpu().numpy()[:spec.shape[0]].copy())  # not a view of .grad
    return float(out.loss.detach()), grads


def jax_grads(model, ids: np.ndarray, targets: np.ndarray, *, hidden: bool = False):
    """One jitted eval-mode forward and backward: (Outputs, d loss / d parameter by canonical name,
    the raw nnx.State of gradients for an optax update)."""
    import jax.numpy as jnp

    from blues_jax.state_dict_adapter import param_at as _jax_param

    grads_fn = _jax_fns()[1]
    with _eval(model):
        (_, (out, blocks, moe_in)), grads = grads_fn(model, jnp.asarray(ids, jnp.int32),
                                                     jnp.asarray(targets, jnp.int32), hidden=hidden)
    by_name = {spec.name: np.asarray(_jax_param(grads, spec.path)[...], np.float32)[:spec.shape[0]]
               for spec in canonical_layout(model.config)}
    return _jax_outputs(out, blocks, moe_in), by_name, grads


# ---- comparing two forwards ------------------------------------------------------------------------

def token_kl(logits_p: np.ndarray, logits_q: np.ndarray, chunk: int = 64) -> np.ndarray:
    """KL(p || q) per token, in float64, of two logit tensors [..., V] (chunked over tokens)."""
    p2 = logits_p.reshape(-1, logits_p.shape[-1])
    q2 = logits_q.reshape(-1, logits_q.shape[-1])
    out = np.empty(p2.shape[0], np.float64)
    for s in range(0, p2.shape[0], chunk):
        lp = _log_softmax(p2[s:s + chunk].astype(np.float64))
        lq = _log_softmax(q2[s:s + chunk].astype(np.float64))
        out[s:s + chunk] = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.maximum(out, 0.0).reshape(logits_p.shape[:-1])  # tiny negatives are rounding


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


@dataclass
class LayerComparison:
    layer: int
    routing_agreement: float  # fraction of tokens whose k chosen experts are identical (in order)
    router_prob_max_diff: float
    hidden_max_diff: float | None  # max |h_a - h_b| of the block's output (None if not captured)
    hidden_rel_diff: float | None  # hidden_max_diff / max |h_a|


@dataclass
class Comparison:
    max_logit_diff: float
    mean_kl: float
    max_kl: float
    routing_agreement: float  # over all layers and tokens
    router_prob_max_diff: float
    loss_diffs: dict[str, float]  # name -> relative difference |a - b| / max(|a|, tiny)
    layers: list[LayerComparison]
    tokens: int

    def worst_layer(self) -> LayerComparison | None:
        """The first layer whose routing disagrees, else the one with the largest hidden difference."""
        for layer in self.layers:
            if layer.routing_agreement < 1.0:
                return layer
        with_hidden = [lc for lc in self.layers if lc.hidden_max_diff is not None]
        return max(with_hidden, key=lambda lc: lc.hidden_max_diff) if with_hidden else None


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare(a: Outputs, b: Outputs) -> Comparison:
    """How far `b` is from `a` (a is the reference side)."""
    kl = token_kl(a.logits, b.logits)
    same = np.all(a.expert_indices == b.expert_indices, axis=-1)  # [L, B, T]
    layers = []
    for i in range(a.expert_indices.shape[0]):
        hidden_max = hidden_rel = None
        if a.hidden and b.hidden:
            diff = float(np.max(np.abs(a.hidden[i] - b.hidden[i])))
            hidden_max, hidden_rel = diff, diff / max(float(np.max(np.abs(a.hidden[i]))), 1e-30)
        layers.append(LayerComparison(i, float(same[i].mean()),
                                      float(np.max(np.abs(a.router_probs[i] - b.router_probs[i]))),
                                      hidden_max, hidden_rel))
    losses = {"aux_loss": rel_diff(a.aux_loss, b.aux_loss), "z_loss": rel_diff(a.z_loss, b.z_loss)}
    if a.lm_loss is not None and b.lm_loss is not None:
        losses["lm_loss"] = rel_diff(a.lm_loss, b.lm_loss)
        losses["loss"] = rel_diff(a.loss, b.loss)
    return Comparison(max_logit_diff=float(np.max(np.abs(a.logits - b.logits))), mean_kl=float(kl.mean()),
                      max_kl=float(kl.max()), routing_agreement=float(same.mean()),
                      router_prob_max_diff=float(np.max(np.abs(a.router_probs - b.router_probs))),
                      loss_diffs=losses, layers=layers, tokens=int(kl.size))


def merge(parts: list[Comparison]) -> Comparison:
    """One comparison over several batches (token-weighted means, maxima of maxima)."""
    if len(parts) == 1:
        return parts[0]
    w = np.array([p.tokens for p in parts], np.float64)
    wmean = lambda xs: float(np.sum(np.array(xs) * w) / w.sum())  # noqa: E731
    layers = []
    for i in range(len(parts[0].layers)):
        ls = [p.layers[i] for p in parts]
        hm = [lc.hidden_max_diff for lc in ls]
        hr = [lc.hidden_rel_diff for lc in ls]
        layers.append(LayerComparison(i, wmean([lc.routing_agreement for lc in ls]),
                                      max(lc.router_prob_max_diff for lc in ls),
                                      None if None in hm else max(hm), None if None in hr else max(hr)))
    return Comparison(max_logit_diff=max(p.max_logit_diff for p in parts), mean_kl=wmean([p.mean_kl for p in parts]),
                      max_kl=max(p.max_kl for p in parts),
                      routing_agreement=wmean([p.routing_agreement for p in parts]),
                      router_prob_max_diff=max(p.router_prob_max_diff for p in parts),
                      loss_diffs={k: max(p.loss_diffs[k] for p in parts) for k in parts[0].loss_diffs},
                      layers=layers, tokens=int(w.sum()))
