"""DeepSpeed settings against one another on one GPU: the project's ds_config.json and variants of it.

    python scripts/ds_variants.py [--presets tiny bench] [--steps 6]

Each variant is the bench's DeepSpeed step (bench/deepspeed_step.py: ZeRO-2, bf16 in the mode the
config chooses, this process as a single rank) with some keys of ds_config.json overridden; prints
tokens/s per preset, to choose the config's defaults from measurements (not memory: DeepSpeed keeps
references to earlier engines in the process, so a later variant's peak includes them). Needs a GPU
and DeepSpeed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import deepspeed_step  # noqa: E402
from bench.train_step import torch_train, train_workload  # noqa: E402

# Each variant changes ds_config.json in one respect (or two, named), or the step, so its effect is its
# own: name -> (keys of ds_config.json overridden, build_engine's device_skip: blues_torch/deepspeed_skip.py's
# replacements of ZeRO's step and end-of-backward epilogue, True for both).
VARIANTS = {
    "ds_config.json": ({}, True),
    # the skip decided on the device, DeepSpeed's epilogue synchronising the device at the end of backward
    "DeepSpeed epilogue": ({}, ("step",)),
    # DeepSpeed's own step, reading the gradient norm and overflow on the host, and its own epilogue
    "host skip (DeepSpeed step)": ({}, False),
    "overlap_comm off": ({"zero_optimization": {"overlap_comm": False}}, True),
    "overlap off, 5e8 buckets": ({"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8,
                                                        "allgather_bucket_size": 5e8}}, True),
    "no overflow check": ({"bf16": {"check_grad_overflow": False}}, True),
    # float32 module and gradients under torch.autocast (as plain PyTorch trains), no bf16 master copy
    "torch_autocast": ({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--compile", action="store_true",
                   help="each engine's module compiled block by block, as train_torch.py --compile")
    p.add_argument("--plain", action="store_true",
                   help="first, the same step without DeepSpeed (bench/train_step.py's torch row) as the reference")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    print(f"{'variant':<26} {'preset':<6} {'tokens/s':>10}")
    if args.plain:
        for preset in args.presets:
            row = torch_train(train_workload(preset, False), steps=args.steps, warmup=args.warmup, compile=args.compile,
                              check=False)
            print(f"{'plain PyTorch (no engine)':<26} {preset:<6} {row.tokens_per_s:>10,.0f}", flush=True)
    # In VARIANTS' order, whatever the command line's: torch_autocast comes last because DeepSpeed marks
    # autocast initialised for the whole process (deepspeed/runtime/torch_autocast.py), which changes
    # every ZeRO optimizer built after it.
    for name in sorted(set(args.variants), key=list(VARIANTS).index):
        overrides, device_skip = VARIANTS[name]
        for preset in args.presets:
            row = deepspeed_step.deepspeed_train(train_workload(preset, False), steps=args.steps, warmup=args.warmup,
                                                 compile=args.compile, check=False, overrides=overrides,
                                                 device_skip=device_skip)
            print(f"{name:<26} {preset:<6} {row.tokens_per_s:>10,.0f}", flush=True)


if __name__ == "__main__":
    main()
