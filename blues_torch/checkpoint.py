"""train_torch.py's checkpoints in blues.checkpointing's atomic step directories.

Plain: DIR/checkpoints/step_XXXXXXXX/ holds model.safetensors (the module's state dict: canonical
names, embedding with its zero padding rows), optimizer.pt and rng.pt (rng_rank<R>.pt for the other
ranks of a torchrun; tensors and primitives only:
loaded with torch.load(weights_only=True), so loading never runs code), trainer_state.json (step,
config, flags, data position, bad-step counter, python/numpy RNG) and the COMMITTED manifest.
DeepSpeed: the engine's own `save_checkpoint` shards (every rank writes its own) in `ds/` of the same
directory, each rank's RNG, and beside them the layout-free state a plain checkpoint holds
(model.safetensors with ZeRO's float32 master weights, optimizer.pt with its Adam moments and step:
blues_torch/deepspeed_state.py). Resuming restores all of it, so a resumed run repeats an
uninterrupted one bit for bit on CPU in float32.

Checkpoints are layout-free: under expert parallelism each rank's expert slices (weights and
AdamW moments) are gathered into the canonical full [E, ...] tensors before rank 0 writes, and each
rank cuts its own slice out on load (blues_torch/expert_parallel.py), so a run saved by one process
resumes under torchrun with any --expert_parallel, and back. A DeepSpeed checkpoint resumes from
DeepSpeed's own files in the layout (ranks, --expert_parallel) and module dtype (bf16 in DeepSpeed's
bf16 mode; float32 in fp32 and torch_autocast) that saved it, and from the layout-free files in any
other layout or dtype, with or without DeepSpeed; a plain one resumes under DeepSpeed the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blues import checkpointing as ckpt
from blues.canonical import ConversionError, from_module_arrays, to_module_arrays
from blues.errors import CheckpointError, UsageError
from blues.train_args import TrainArgs
from blues.train_loop import BadStepGuard, log
from blues_torch.distributed import Dist
from blues_torch.expert_parallel import ParallelLayout, gather_experts, slice_experts
from parity.optim_convert import AdamWState, deepspeed_safe_globals, from_torch, to_torch


@contextlib.contextmanager
def _weights_only_loads(extra_safe_globals=()):
    """Force every torch.load inside (DeepSpeed's included) to weights_only=True."""

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _safe_load(path: Path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path} cannot be loaded safely (refused, nothing executed): {first}") from None


def rng_file(rank: int, deepspeed: bool = False) -> str:
    """A checkpoint's RNG file of `rank` (a plain one's rank 0 keeps the one-process name)."""
    return "rng.pt" if rank == 0 and not deepspeed else f"rng_rank{rank:05d}.pt"


def rng_state(gen) -> dict:
    state = {"torch_cpu": torch.get_rng_state(), "router": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen) -> None:
    torch.set_rng_state(state["torch_cpu"])
    gen.set_state(state["router"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_rng_state() -> dict:
    """python and numpy global RNG states, as JSON (neither is used by training; kept for completeness)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_host_rng_state(state: dict) -> None:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def optimizer_param_names(model, optimizer) -> list[str]:
    """The layout path of each parameter index in `optimizer.state_dict()` (its groups' order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def map_moments(opt_state: dict, names: list[str], fn) -> dict:
    """`opt_state` (torch.optim state_dict) with each moment tensor dict {path: tensor} passed through
    `fn` (gather_experts / slice_experts): the moments in canonical or in this rank's layout."""
    state = {i: dict(s) for i, s in opt_state["state"].items()}
    for key in ("exp_avg", "exp_avg_sq"):
        moments = fn({names[i]: s[key] for i, s in state.items() if key in s})
        for i, s in state.items():
            if key in s:
                s[key] = moments[names[i]]
    return {**opt_state, "state": state}


def write_weights(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file({k: v.to("cpu").contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def read_weights(path: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'} is not a readable safetensors file ({e})") from None


def plain_optimizer_state(config, moments: dict[str, dict], step: int, hp: dict) -> dict:
    """Canonical moments by layout path -> the optimizer.pt of a plain run (train_torch.py's AdamW
    groups and indices: parity/optim_convert.py's to_torch)."""
    neutral = {key: from_module_arrays({k: v.float().cpu().numpy() for k, v in m.items()}, config,
                                       what=f"optimizer {key} of", check=False) for key, m in moments.items()}
    state = AdamWState(step=step, exp_avg=neutral["exp_avg"], exp_avg_sq=neutral["exp_avg_sq"], lr=hp["lr"],
                       betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    return to_torch(state, config, flags=hp["flags"])


def moments_of_plain(opt_state: dict, config, device) -> tuple[dict[str, dict], int]:
    """A plain optimizer.pt -> ({"exp_avg": .., "exp_avg_sq": ..} canonical tensors by layout path, step)."""
    state = from_torch(opt_state, config)
    return ({key: {k: torch.from_numpy(v).to(device) for k, v in to_module_arrays(getattr(state, key), config,
                                                                                   check=False).items()}
             for key in ("exp_avg", "exp_avg_sq")}, state.step)


def full_state_dict(model, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to its canonical [E, ...] (collective)."""
    return gather_experts({k: v.detach() for k, v in model.state_dict().items()}, layout)


class Checkpointer:
    """Saves/loads plain or DeepSpeed checkpoints in blues.checkpointing's atomic directories."""

    def __init__(self, args: TrainArgs, dist: Dist, model, optimizer, engine, gen, layout: ParallelLayout):
        self.args, self.dist, self.model, self.optimizer, self.engine, self.gen, self.layout = (
            args, dist, model, optimizer, engine, gen, layout)
        self.root = Path(args.out_dir) / "checkpoints"
        # DeepSpeed is optional: its state helpers are imported only by a run that uses it.
        self.ds_state = importlib.import_module("blues_torch.deepspeed_state") if engine is not None else None
        self.last: Path | None = None

    def trainer_state(self, step: int, data_state: dict, guard: BadStepGuard) -> dict:
        return {"step": step, "framework": "torch", "deepspeed": self.engine is not None,
                "module_dtype": module_dtype(self.model),
                "model_config": self.args.model_config.to_dict(), "train_args": self.args.to_dict(),
                "world_size": self.dist.world_size, "data": data_state, "bad_steps": guard.state_dict(),
                "host_rng": host_rng_state()}

    def save(self, step: int, data_state: dict, guard: BadStepGuard) -> Path:
        state = self.trainer_state(step, data_state, guard)
        if self.engine is None:
            # Collective under torchrun: every rank's experts and RNG go to rank 0, which writes.
            weights = full_state_dict(self.model, self.layout)
            names = optimizer_param_names(self.model, self.optimizer)
            opt_state = map_moments(self.optimizer.state_dict(), names, lambda t: gather_experts(t, self.layout))
            rngs = self.dist.gather(rng_state(self.gen))

            def write(tmp: Path) -> None:
                write_weights(tmp, weights)
                torch.save(opt_state, tmp / "optimizer.pt")
                for rank, rng in enumerate(rngs):
                    torch.save(rng, tmp / rng_file(rank))
                ckpt.write_json(tmp / ckpt.TRAINER_STATE, state)

            if self.dist.is_main:
                ckpt.save(self.root, step, write, framework="torch")
            self.dist.barrier()
            path = self.root / ckpt.step_dirname(step)
        else:
            # Collective: every rank writes its ZeRO shards and its RNG; rank 0 commits.
            tmp = self.root / f".tmp-{ckpt.step_dirname(step)}-ds"
            if self.dist.is_main:
                ckpt.begin(self.root, step, token="ds")
            self.dist.barrier()
            self.engine.save_checkpoint(str(tmp), tag="ds", client_state={"step": step}, save_latest=False)
            torch.save(rng_state(self.gen), tmp / rng_file(self.dist.rank, deepspeed=True))
            if self.ds_state.has_zero_partitions(self.engine):
                # The layout-free state beside DeepSpeed's (whose module file holds rank 0's experts only).
                weights, moments, opt_step = self.ds_state.full_zero_state(self.engine, self.model, self.layout)
                if self.dist.is_main:
                    write_weights(tmp, weights)
                    torch.save(plain_optimizer_state(self.args.model_config, moments, opt_step,
                                                     self.ds_state.adamw_hyperparameters(self.engine)),
                               tmp / "optimizer.pt")
            self.dist.barrier()
            path = None
            if self.dist.is_main:
                ckpt.write_json(tmp / ckpt.TRAINER_STATE, state)
                path = ckpt.commit(tmp, self.root, step, framework="torch")
            self.dist.barrier()
            path = self.root / ckpt.step_dirname(step)
        if self.dist.is_main:
            ckpt.prune(self.root, self.args.keep_checkpoints)
        self.last = path
        return path

    def load(self, path: Path, state: dict) -> None:
        """Restore weights, optimizer and RNG from `path` (verified; `state` checked by check_resume):
        DeepSpeed's own files in the layout that saved them, else the layout-free ones."""
        if self.engine is None:
            self._load_plain(path, state)
        elif (same_deepspeed_layout(state, self.args, self.dist)
              and saved_module_dtype(state) == module_dtype(self.model)):
            self._load_deepspeed(path, state)
        else:
            self._load_into_deepspeed(path, state)
        set_host_rng_state(state["host_rng"])

    def _load_plain(self, path: Path, state: dict) -> None:
        weights = read_weights(path, self.dist.device)
        try:
            self.model.load_state_dict(slice_experts(weights, self.layout), strict=True)
            names = optimizer_param_names(self.model, self.optimizer)
            opt_state = _safe_load(path / "optimizer.pt", self.dist.device)
            self.optimizer.load_state_dict(map_moments(opt_state, names, lambda t: slice_experts(t, self.layout)))
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this model/optimizer: {first}") from None
        self._load_rng(path, state)

    def _load_rng(self, path: Path, state: dict) -> None:
        """This rank's RNG if the checkpoint has it (a run saved with fewer ranks has not)."""
        rng_path = path / rng_file(self.dist.rank, bool(state.get("deepspeed")))
        if rng_path.exists():
            set_rng_state(_safe_load(rng_path, "cpu"), self.gen)
        if self.dist.is_main and self.dist.world_size > int(state.get("world_size", 1)):
            log(f"note: {path} was saved by fewer ranks; the new ranks' router noise and dropout start "
                f"from the seed")

    def _load_deepspeed(self, path: Path, state: dict) -> None:
        with _weights_only_loads(deepspeed_safe_globals()):
            try:
                load_path, client = self.engine.load_checkpoint(str(path), tag="ds", load_module_strict=True,
                                                                load_optimizer_states=True,
                                                                load_lr_scheduler_states=False)
            except CheckpointError:
                raise
            except Exception as e:  # DeepSpeed raises many kinds; name the checkpoint and stop
                first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
                raise CheckpointError(f"{path}: DeepSpeed could not load it ({first})") from None
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint under tag 'ds'")
        if client.get("step") != state["step"]:
            raise CheckpointError(f"{path}: DeepSpeed's step {client.get('step')} != trainer state's {state['step']}")
        if self.layout.expert_group is not None:
            # This rank's experts from the gathered master weights (its moments are in its own ZeRO file).
            self.ds_state.load_zero_weights(self.model, self.layout, read_weights(path, self.dist.device))
        self._load_rng(path, state)

    def _load_into_deepspeed(self, path: Path, state: dict) -> None:
        """A checkpoint of another layout (or a plain one): its layout-free weights, moments and step."""
        weights = read_weights(path, self.dist.device)
        try:
            moments, step = moments_of_plain(_safe_load(path / "optimizer.pt", "cpu"), self.args.model_config,
                                             self.dist.device)
            self.ds_state.load_zero_state(self.engine, self.model, self.layout, weights, moments, step)
        except (RuntimeError, ValueError, KeyError, IndexError, ConversionError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this model/optimizer: {first}") from None
        self._load_rng(path, state)


def write_param_hash(model, out_dir, rank: int, tag: str) -> None:
    """Test hook (BLUES_WRITE_PARAM_HASH=1): sha256 over this rank's parameters, in order."""
    if os.environ.get("BLUES_WRITE_PARAM_HASH") != "1":
        return
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    Path(out_dir, f"param_sha256_rank{rank}_{tag}.txt").write_text(h.hexdigest() + "\n")


def same_deepspeed_layout(state: dict, args: TrainArgs, dist: Dist) -> bool:
    """Whether a checkpoint's DeepSpeed files fit this run: DeepSpeed both times, same ranks and P."""
    return (bool(state.get("deepspeed")) and args.deepspeed is not None
            and (int(state["world_size"]), int(state["train_args"].get("expert_parallel", 1)))
            == (dist.world_size, args.expert_parallel))


def module_dtype(model) -> str:
    """"float32" or "bfloat16": the dtype of the module's parameters."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def saved_module_dtype(state: dict) -> str:
    """The module dtype a checkpoint's run trained; without the `module_dtype` entry, the one its flags
    imply (DeepSpeed bf16 without torch_autocast: a bf16 module)."""
    if "module_dtype" in state:
        return state["module_dtype"]
    return "bfloat16" if state.get("deepspeed") and state["train_args"].get("precision") == "bf16" else "float32"


def check_resumable(path: Path, args: TrainArgs, dist: Dist) -> dict:
    """The checkpoint's trainer state, refused early if it cannot continue this run."""
    state = ckpt.read_trainer_state(path, framework="torch")
    notes = ckpt.check_resume(state, args.to_dict(), world_size=dist.world_size, checkpoint=path)
    layout_free = (path / "optimizer.pt").is_file()  # DeepSpeed ZeRO-0 checkpoints have none
    if state.get("deepspeed") and not layout_free and not same_deepspeed_layout(state, args, dist):
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint of {state['world_size']} ranks with --expert_parallel "
                              f"{state['train_args'].get('expert_parallel', 1)} without the layout-free state; resume "
                              f"it with --deepspeed, the same ranks and --expert_parallel")
    if int(state["step"]) >= args.max_steps:
        raise UsageError(f"--max_steps {args.max_steps}: the checkpoint {path} is already at step "
                         f"{state['step']}; pass a larger --max_steps to train further")
    if dist.is_main:
        for note in notes:
            log(f"note: {note}")
    return state
