"""Convert a Blues checkpoint between PyTorch, JAX and safetensors, optimizer state included.

    python -m parity.convert_checkpoint SRC DST --to torch|jax|safetensors|hf|hf-mixtral [--dtype bfloat16] [--with_optimizer]

SRC is anything parity/checkpoint_read.py reads (`read_source`, re-exported here, as `Loaded`):
- a train_torch.py checkpoint directory (`.../checkpoints/step_XXXXXXXX`): plain (model.safetensors,
  optimizer.pt, rng.pt) or DeepSpeed ZeRO-1/2 (the same layout-free files beside `ds/`, in any
  --expert_parallel; without them `ds/`, read with DeepSpeed's zero_to_fp32 utilities);
- a train_jax.py checkpoint directory (Orbax `arrays/` + trainer state);
- a run directory (either trainer's `--out_dir`) or its `checkpoints/`: the newest checkpoint that
  verifies against its COMMITTED manifest; the seed's name `DIR/model_iter_N.pt` for its step N;
- an export: a directory with `model.safetensors` + `config.json` (or the `.safetensors` file), as this
  script writes it, with `optimizer.safetensors` + `trainer_state.json` when it carries a training run;
- a `.pt` state dict with its config (weights only);
- a Hugging Face directory that `--to hf` wrote (model_type "blues"; parity/hf/read.py), weights only.

DST is a new (or empty) directory:
- `--to torch`: a run directory holding `checkpoints/step_XXXXXXXX/` in train_torch.py's plain format;
  continue with `python train_torch.py --out_dir DST --resume auto` and the run's flags;
- `--to jax`: the same for train_jax.py (Orbax, written by Orbax's CheckpointManager);
- `--to safetensors`: an export (`model.safetensors` + `config.json`, canonical names, float32 or
  `--dtype bfloat16`); `--with_optimizer` adds `optimizer.safetensors` (AdamW moments, float32, twice
  the weights' size), `trainer_state.json` and the run's `metrics.jsonl`, so torch -> safetensors ->
  jax resumes too.
- `--to hf`: a Hugging Face transformers directory (model, o200k tokenizer, remote code; parity/hf/export.py)
  that `AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)` loads offline; `--to hf-mixtral`:
  a plain MixtralForCausalLM directory, for the configs Mixtral computes exactly (else one line naming the field).

What carries over: the weights (bit-exact in float32), the model config, the AdamW state (moments
and step count; parity/optim_convert.py documents the exact torch <-> optax correspondence), the
step, the data position and the bad-step counter, so the converted run's next update is the one the
original run would have made; and the run's metrics history (`metrics.jsonl` up to the step, with its
TensorBoard scalars rebuilt from it in `tb/`), so the converted run's logs and plots continue it. What cannot: the random streams (router noise, dropout) are
framework-specific and restart from the run's seed in the other framework (a same-framework
conversion keeps them); a ZeRO-partitioned layout is not written back (torch output is a plain
checkpoint). The global batch (batch_size x data-parallel ranks) must stay the same on resume.

A source without a training run (a weights-only export or .pt file) becomes a weights-only checkpoint, which
generate.py and parity.check read but a trainer does not resume (start a run from the export with
`--init_from` instead).

Failure is one line naming the problem (exit 1; 2 for a bad flag) and leaves nothing behind:
everything is written into a hidden temporary directory next to DST, renamed into place at the end,
with the permissions the user's umask gives new files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError, UsageError
from blues.layout import canonical_layout
from blues.safetensors_io import current_umask
from blues.metrics import TRAIN_KEYS, MetricsLogger, read_metrics
from blues.checkpoint_source import OPTIMIZER_FORMAT, OPTIMIZER_NAME, Loaded, resolve_source
from parity.checkpoint_read import ARRAYS, TRAINER, read_source
from blues.canonical import ConversionError, check_canonical, flatten, nest, to_module_arrays
from parity.hf.export import check_mixtral, hf_usage, write_hf, write_hf_mixtral
from parity.hf.read import hf_model_type, read_hf

TARGETS = ("torch", "jax", "safetensors", "hf", "hf-mixtral")
TORCH_ROUTER_SEED = (7919, 1)  # train_torch.py seeds its router-noise generator with seed * 7919 + 1 + rank


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ==== writing ========================================================================================

def _target_state(src: Loaded, framework: str) -> dict:
    """The trainer state of the converted checkpoint: the source's, re-labelled for `framework`."""
    provenance = {"path": str(src.path), "kind": src.kind}
    if src.trainer_state is None:
        return {"step": 0, "framework": framework, "model_config": src.config.to_dict(), "weights_only": True,
                "converted_from": provenance}
    state = json.loads(json.dumps(src.trainer_state))  # a deep copy
    state["framework"] = framework
    state["converted_from"] = provenance
    state.pop("module_dtype", None)  # the source run's module (train_torch.py); the converted files hold float32
    if isinstance(state.get("train_args"), dict):
        state["train_args"]["framework"] = framework
        if framework == "torch":
            state["train_args"]["deepspeed"] = None
    if framework == "torch":
        state["deepspeed"] = False  # a plain checkpoint: resume without --deepspeed
        state.pop("processes", None)
        if "host_rng" not in state:
            state["host_rng"] = _fresh_host_rng(_seed(state))
    else:
        state.pop("deepspeed", None)
        state.pop("host_rng", None)
        state.setdefault("processes", 1)
    return state


def _seed(state: dict) -> int:
    args = state.get("train_args") or {}
    return int(args.get("seed", 0) or 0)


def _fresh_host_rng(seed: int) -> dict:
    """python/numpy RNG states in train_torch.py's JSON form, freshly seeded."""
    name, keys, pos, has_gauss, gauss = np.random.RandomState(seed).get_state()
    version, internal, gauss_next = random.Random(seed).getstate()
    return {"numpy": [name, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_next]}


def write_torch(src: Loaded, staging: Path) -> Path:
    """`staging/checkpoints/step_N/` in train_torch.py's plain format."""
    import torch
    from safetensors.torch import save_file

    from parity import optim_convert

    state = _target_state(src, "torch")
    module = to_module_arrays(src.arrays, src.config)

    def write(tmp: Path) -> None:
        save_file({k: torch.from_numpy(a) for k, a in module.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if src.optimizer is not None and src.trainer_state is not None:
            # train_torch.py makes its AdamW with fused=True; a saved group's flags win on load.
            flags = src.torch_flags if src.torch_flags is not None else {"fused": True}
            torch.save(optim_convert.to_torch(src.optimizer, src.config, flags=flags), tmp / "optimizer.pt")
            rng = src.rng if src.framework == "torch" and isinstance(src.rng, dict) else _fresh_torch_rng(_seed(state))
            torch.save(rng, tmp / "rng.pt")
        ckpt.write_json(tmp / ckpt.TRAINER_STATE, state)

    return ckpt.save(staging / "checkpoints", src.step, write, framework="torch")


def _fresh_torch_rng(seed: int) -> dict:
    """rng.pt of a fresh train_torch.py run with this seed (rank 0)."""
    import torch

    mul, add = TORCH_ROUTER_SEED
    return {"torch_cpu": torch.Generator().manual_seed(seed).get_state(),
            "router": torch.Generator().manual_seed(seed * mul + add).get_state()}


def write_jax(src: Loaded, staging: Path) -> Path:
    """`staging/checkpoints/step_N/` in train_jax.py's format: Orbax items arrays/ and trainer_state/,
    written by Orbax's CheckpointManager, then trainer_state.json and the COMMITTED manifest."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from parity import optim_convert

    state = _target_state(src, "jax")
    params = nest({k: jnp.asarray(a) for k, a in to_module_arrays(src.arrays, src.config).items()})
    arrays = {"params": params}
    if src.optimizer is not None and src.trainer_state is not None:
        arrays["opt_state"] = optim_convert.to_optax(src.optimizer, src.config)
        if src.framework == "jax" and src.rng is not None:
            arrays["rng"] = nest({k: jnp.asarray(a) for k, a in flatten(src.rng).items()})
        else:
            arrays["rng"] = _fresh_jax_rng(src.config, _seed(state))
    root = (staging / "checkpoints").resolve()
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        step_prefix="step", step_format_fixed_length=8, create=True, enable_async_checkpointing=False))
    try:
        manager.save(src.step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                                                          TRAINER: ocp.args.JsonSave(state)}), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    path = root / ckpt.step_dirname(src.step)
    ckpt.write_json(path / ckpt.TRAINER_STATE, state)
    ckpt.seal(path, src.step, framework="jax")
    return path


def _fresh_jax_rng(config: BluesConfig, seed: int):
    """The model's random streams (router noise, dropout) as train_jax.py starts them for this seed,
    as the uint32 key data it stores.

    The streams do not depend on the tensor shapes (parameter draws use their own stream), so they
    are taken from a model of the same depth with the smallest sizes: the same keys, without
    initialising a 200k-row embedding."""
    import jax
    from flax import nnx

    from blues_jax import BluesModel

    small = dataclasses.replace(config, vocab_size=1, hidden_size=2, head_dim=2, num_attention_heads=1,
                                num_key_value_heads=1, tot_num_experts=1, chosen_num_experts=1,
                                embedding_multiplier_scale=1, max_position_embeddings=1)
    key = jax.random.key(seed)
    rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), noise=jax.random.fold_in(key, 1),
                    dropout=jax.random.fold_in(key, 2))
    rng = nnx.to_pure_dict(nnx.state(BluesModel(small, rngs=rngs), nnx.RngState))
    is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, rng)


def write_export(src: Loaded, staging: Path, dtype: str) -> Path:
    """`staging/`: model.safetensors + config.json (+ optimizer.safetensors + trainer_state.json when
    `src` carries an optimizer state)."""
    from blues.safetensors_io import save_export, write_safetensors

    meta = {"blues.source": src.kind, "blues.step": str(src.step)}
    save_export(staging, src.arrays, src.config, dtype=dtype, metadata=meta)
    if src.optimizer is not None and src.trainer_state is not None:
        opt = src.optimizer
        tensors = {f"exp_avg.{k}": a for k, a in opt.exp_avg.items()}
        tensors.update({f"exp_avg_sq.{k}": a for k, a in opt.exp_avg_sq.items()})
        hp = {"step": opt.step, "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
              "weight_decay": opt.weight_decay, "decay": "tensors with ndim >= 2"}
        write_safetensors(staging / OPTIMIZER_NAME, tensors, metadata={"format": OPTIMIZER_FORMAT,
                                                                       "blues.adamw": json.dumps(hp)})
        state = json.loads(json.dumps(src.trainer_state))
        state["converted_from"] = {"path": str(src.path), "kind": src.kind}
        ckpt.write_json(staging / ckpt.TRAINER_STATE, state)
    return staging


def source_metrics(src: Loaded) -> list[dict]:
    """The metrics.jsonl records of the run SRC belongs to, up to its step: a trainer checkpoint's
    run directory (`RUN/checkpoints/step_N` -> `RUN`), or an export directory that carries one."""
    if src.trainer_state is None:
        return []
    path = src.path if src.path.is_dir() else src.path.parent
    run = path.parent.parent if path.parent.name == "checkpoints" else path
    return [r for r in read_metrics(run / "metrics.jsonl") if int(r.get("step", 0)) <= src.step]


def write_metrics(records: list[dict], out_dir: Path, *, tensorboard: bool) -> None:
    """Replay `records` through the trainers' logger: the same metrics.jsonl lines (and TensorBoard
    scalars under `out_dir/tb`) the run wrote."""
    if not records:
        return
    with MetricsLogger(out_dir, tensorboard=tensorboard) as logger:
        for r in records:  # the record kinds of blues/metrics.py
            if "loss" in r:
                logger.log_train(**{k: r.get(k) for k in TRAIN_KEYS})
            elif "val_loss" in r:
                logger.log_eval(step=r["step"], val_loss=r["val_loss"], experts=r.get("experts") or [])


def apply_umask(root: Path) -> None:
    """Give everything under `root` (itself included) the mode a plain open()/mkdir() would: some
    writers make private 0600 temporary files (tempfile.mkstemp) and rename them into place."""
    umask = current_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ==== the command ====================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m parity.convert_checkpoint",
                description="Convert a Blues checkpoint (weights, config, AdamW state) between train_torch.py, "
                            "train_jax.py and safetensors.")
    p.add_argument("src", metavar="SRC", help="checkpoint, run directory, export directory or .safetensors file")
    p.add_argument("dst", metavar="DST", help="new (or empty) output directory")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights dtype of a safetensors export (default float32; torch/jax stay float32)")
    p.add_argument("--with_optimizer", action="store_true",
                   help="safetensors: also export the AdamW state, trainer state and metrics history, so a "
                        "trainer can resume from the export (torch/jax checkpoints always carry them)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _check_dst(dst: Path, src: Path) -> None:
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise UsageError(f"DST {dst} already exists and is not an empty directory; choose a new path "
                         "(nothing is overwritten)")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UsageError(f"DST {dst} must lie outside SRC {src}")


def convert(src_path: str | os.PathLike, dst_path: str | os.PathLike, to: str, *, dtype: str = "float32",
            with_optimizer: bool | None = None) -> tuple[Loaded, Path]:
    """Read SRC, write DST atomically; returns (what was read, the checkpoint/export written).
    `with_optimizer`: export the training state too (safetensors only; trainer checkpoints always do)."""
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    if dtype != "float32" and to != "safetensors":
        raise UsageError(f"--dtype {dtype} applies to --to safetensors only; trainer checkpoints stay float32")
    if with_optimizer and to != "safetensors":
        raise UsageError("--with_optimizer applies to --to safetensors only; trainer checkpoints always carry "
                         "the optimizer state")
    src_path, dst = resolve_source(src_path), Path(dst_path)  # (a missing SRC is reported first)
    _check_dst(dst, src_path)
    src = read_hf(src_path) if hf_model_type(src_path) else read_source(src_path)
    log(f"read {src.path}: {src.kind} checkpoint" + (f", step {src.step}" if src.trainer_state else ", weights only"))
    if with_optimizer and src.optimizer is None:
        raise UsageError(f"--with_optimizer: {src.path} holds weights only, no optimizer state to export")
    if to == "safetensors" and not with_optimizer:
        src = dataclasses.replace(src, optimizer=None)  # the step stays in the export's metadata
    check_canonical(src.arrays, src.config)
    if to == "hf-mixtral":
        check_mixtral(src.config)  # refused before anything is written
    if src.optimizer is not None:
        log(f"converting {len(src.arrays)} tensors and the AdamW state (step {src.optimizer.step})")
    made = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent.resolve() / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        log(f"writing {to} {'checkpoint' if to in ('torch', 'jax') else 'export'} to {dst}")
        if to == "torch":
            written = write_torch(src, staging)
        elif to == "jax":
            written = write_jax(src, staging)
        elif to == "safetensors":
            written = write_export(src, staging, dtype)
        elif to == "hf":
            written = write_hf(src.arrays, src.config, staging)
        else:
            written = write_hf_mixtral(src.arrays, src.config, staging)
        if src.optimizer is not None and to in ("torch", "jax", "safetensors"):  # a run that continues: its history goes with it
            write_metrics(source_metrics(src), staging, tensorboard=to != "safetensors")
        apply_umask(staging)
        written = dst / written.resolve().relative_to(staging)
        if dst.exists():
            dst.rmdir()  # an empty directory the user made for us
        os.replace(staging, dst)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(made):  # parents this call created, innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, BluesError):
            raise CheckpointError(f"cannot write {dst}: {e.strerror or e}") from None
        if isinstance(e, ConversionError):
            raise CheckpointError(f"{src_path}: {e}") from None
        raise
    return src, written


def summary(src: Loaded, written: Path, to: str, dtype: str) -> str:
    n_params = sum(int(np.prod(s.shape)) for s in canonical_layout(src.config))
    kind = {"torch": "train_torch.py checkpoint", "jax": "train_jax.py checkpoint (Orbax)",
            "safetensors": "safetensors export", "hf": "Hugging Face transformers model (model_type blues)",
            "hf-mixtral": "Hugging Face transformers MixtralForCausalLM"}[to]
    lines = [f"wrote {written}: {kind}, step {src.step}",
             f"  weights: {len(src.arrays)} tensors, {n_params:,} parameters, "
             f"{dtype if to == 'safetensors' else 'float32'}"]
    if to in ("hf", "hf-mixtral"):
        lines.append("  optimizer: not exported (a transformers directory holds the model and tokenizer)")
        lines.append(hf_usage(written, trust_remote_code=to == "hf"))
        return "\n".join(lines)
    opt = src.optimizer if src.trainer_state is not None else None
    if opt is not None:
        lines.append(f"  optimizer: AdamW step {opt.step}, first and second moments of {opt.num_tensors} tensors "
                     f"(float32); betas {opt.betas}, eps {opt.eps:g}, weight_decay {opt.weight_decay:g}")
        state = src.trainer_state
        batch = (state.get("train_args") or {}).get("batch_size")
        world = int(state.get("world_size", 1) or 1)
        if to != "safetensors":
            script = f"train_{to}.py"
            run_dir = written.parent.parent
            lines.append(f"  resume: python {script} --out_dir {shlex.quote(str(run_dir))} --resume auto, with the run's "
                         "other flags")
            if batch is not None:
                lines.append(f"  keep the global batch of {batch * world} sequences (it ran --batch_size {batch} x "
                             f"{world} data-parallel rank(s)): --batch_size {batch * world} on one device")
            if src.framework != to:
                lines.append("  note: router-noise and dropout random streams restart from the seed (they are "
                             "framework-specific)")
    elif src.trainer_state is not None and to == "safetensors":
        lines.append("  optimizer: not exported (weights only: read by generate.py and parity.check; "
                     "--with_optimizer exports the training state too, for resuming)")
    else:
        lines.append("  optimizer: none (weights only: read by generate.py and parity.check; start training "
                     "from an export with --init_from)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, written = convert(args.src, args.dst, args.to, dtype=args.dtype, with_optimizer=args.with_optimizer)
    print(summary(src, written, args.to, args.dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
