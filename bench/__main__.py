"""python -m bench: run benchmark sections, append their rows to <out>/bench_results.json, print the table.

    python -m bench --what all --preset both --framework both --out runs/bench      # everything
    python -m bench --what train --framework jax --preset bench --steps 10 --warmup 3
    python -m bench --what report --out runs/bench                                  # the table only
    python -m bench --quick                                                         # CPU smoke test

Sections (`--what`, comma-separated): dense, gemm, train, trainer (a short train_torch.py /
train_jax.py run: the trainer's own tokens/s beside the train rows), deepspeed, decode, loss, peer-train
(Hugging Face Mixtral), titan-train (torchtitan), peer-decode (peer = the three), kernels
(liger-kernel and cut-cross-entropy against Blues' kernels, bench/library_kernels.py), parity,
all (= all of these but dense, which is measured anyway when the results lack it), report.
Two more take their own flags and must come first: `--what data` (data preparation, bench/data.py)
and `--what quality` (time to validation perplexity 400, whole training runs: bench/time_to_quality.py).
`--framework` picks torch, jax or both for the sections that exist in both; `--preset` picks the
training presets (bench: batch 8 x 2048; tiny: 64 x 256), also of the kernels section. Decoding
runs the tiny preset, the loss and GEMM benches the bench shapes (`--decode-preset` overrides).

Every section is guarded: an exception (out-of-memory included) becomes an error row and the
next section runs; SIGTERM (e.g. from `timeout`) records the running section as an error row
before exiting. Progress lines are flushed as they happen. Exit status: 0 when every section of
this process ran and every correctness check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import traceback

SECTIONS = ("dense", "gemm", "train", "trainer", "deepspeed", "decode", "loss", "peer-train", "titan-train",
            "peer-decode", "kernels", "parity")
ALIASES = {"all": [s for s in SECTIONS if s != "dense"], "peer": ["peer-train", "titan-train", "peer-decode"]}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="all", help="comma-separated: " + ", ".join(SECTIONS) + ", peer, all, report")
    p.add_argument("--preset", default="both", choices=("bench", "tiny", "both"),
                   help="training presets (both: tiny then bench; with --quick: tiny only)")
    p.add_argument("--decode-preset", default="tiny", choices=("bench", "tiny", "small"))
    p.add_argument("--framework", default="both", choices=("torch", "jax", "both"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, excluded (default 3; --quick 1)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed generate calls (default 3; --quick 1)")
    p.add_argument("--peer-decode-steps", type=int, default=1, help="timed peer generate calls (each is slow)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="results directory (default $OUT or bench_out)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a CPU smoke test in ~2 minutes")
    p.add_argument("--torch-compile", default="off", choices=("off", "on", "both"),
                   help="train, deepspeed, decode, peer-train and titan-train: plain eager (off), "
                        "torch.compile only (on), or both rows")
    p.add_argument("--torch-cuda-graph", default="off", choices=("off", "on", "both"),
                   help="train: the PyTorch step replayed from one CUDA graph (on), not (off), or both rows")
    p.add_argument("--ds-optimizer", default="auto", choices=("auto", "deepspeed", "torch"),
                   help="DeepSpeed's FusedAdam (deepspeed), its torch_adam switch (torch), or FusedAdam only if prebuilt (auto)")
    p.add_argument("--dense", default="auto", choices=("auto", "always", "never"),
                   help="measure the dense bf16 matmul rate (auto: if the results lack it for a framework used)")
    p.add_argument("--jax-scan", default="off", choices=("on", "off", "both"),
                   help="JAX blocks as one lax.scan (on; train_jax.py --scan_layers), unrolled (off, the "
                        "default), or both rows")
    p.add_argument("--jax-remat", action="store_true", help="train JAX with rematerialised blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default="full", choices=("full", "compact", "none"),
                   help="the table printed at the end (compact: no notes; bench_table.md always has them)")
    p.add_argument("--merge", default="", help="report: comma-separated results files/dirs to merge into --out first")
    args = p.parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in SECTIONS + tuple(ALIASES) + ("report",)]
    own = [w for w in what if w in ("data", "quality")]
    if own:
        p.error(f"--what {own[0]} takes its own flags and comes first: python -m bench --what {own[0]} ...")
    if unknown:
        p.error(f"--what: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}, peer, all, report")
    wanted = {s for w in what for s in ALIASES.get(w, [w])}
    args.sections = [s for s in SECTIONS if s in wanted]
    args.report_only = what == ["report"]
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.decode_steps = args.decode_steps if args.decode_steps is not None else (1 if args.quick else 3)
    args.frameworks = ("torch", "jax") if args.framework == "both" else (args.framework,)
    # --quick shapes are toys either way; one training preset keeps the smoke test short
    args.presets = (("tiny",) if args.quick else ("tiny", "bench")) if args.preset == "both" else (args.preset,)
    for name in ("steps", "decode_steps", "peer_decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


class Runner:
    """Runs sections one by one; each failure becomes an error row and the next section runs."""

    def __init__(self, results):
        self.results = results
        self.current: tuple[str, str] | None = None
        self.failed = 0
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        from bench.report import Row
        if self.current is not None:
            fw, wl = self.current
            self.results.add(Row(framework=fw, workload=wl, variant="(killed)",
                                 error="killed by SIGTERM (time limit) while running"))
        print("bench: terminated (SIGTERM); rows so far are in " + str(self.results.path), file=sys.stderr, flush=True)
        os._exit(124)

    def run(self, framework: str, workload: str, fn, *args, **kwargs) -> None:
        from bench.report import Row
        from bench.timing import log
        self.current = (framework, workload)
        log(f"== {framework} / {workload}")
        try:
            rows = fn(*args, **kwargs)
            for row in rows if isinstance(rows, list) else [rows]:
                self.results.add(row)
                if row.error or row.check_ok is False:
                    self.failed += 1
                log(f"   -> {_summary(row, self.results)}")
        except Exception as e:  # one failing section must not take the rest down
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            msg = f"{type(e).__name__}: {first}"[:300]
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            self.results.add(Row(framework=framework, workload=workload, variant="(error)", error=msg))
            self.failed += 1
            log(f"   -> ERROR {msg}")
        finally:
            self.current = None
            _free_memory()


def _summary(row, results) -> str:
    if row.skipped:
        return f"skipped: {row.skipped}"
    parts = [f"{row.framework} {row.workload} {row.variant}".strip()]
    if row.tokens_per_s:
        parts.append(f"{row.tokens_per_s:,.0f} tok/s")
    if row.tflops:
        parts.append(f"{row.tflops:.1f} TFLOP/s")
    if row.peak_gib is not None:
        parts.append(f"{row.peak_gib:.2f} GiB")
    if row.check_ok is not None:
        parts.append(("check ok" if row.check_ok else "CHECK FAILED") + f" ({row.check})")
    return ", ".join(parts)


def _free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_sections(args, results) -> Runner:
    from bench.timing import log
    r = Runner(results)
    fws = args.frameworks
    q = args.quick
    compiles = {"off": (False,), "on": (True,), "both": (False, True)}[args.torch_compile]  # PyTorch rows to run
    log(f"sections {', '.join(args.sections)}; frameworks {', '.join(fws)}; presets {', '.join(args.presets)}; "
        f"steps {args.steps} (+{args.warmup} warm-up){'; quick' if q else ''}; results -> {results.path}")

    if "dense" in args.sections:
        for fw in fws:
            r.run(fw, "dense", _dense_row, results, fw, q)
    if "gemm" in args.sections:
        from bench import grouped_gemm
        if "torch" in fws:
            r.run("torch", "grouped gemm", grouped_gemm.torch_gemm, quick=q, steps=args.steps, warmup=args.warmup, seed=args.seed)
        if "jax" in fws:
            r.run("jax", "grouped gemm", grouped_gemm.jax_gemm, quick=q, steps=args.steps, warmup=args.warmup, seed=args.seed)
    if "train" in args.sections:
        from bench import train_step
        for preset in args.presets:
            wl = train_step.train_workload(preset, q)
            if "torch" in fws:
                for compile in compiles:
                    for graph in {"off": (False,), "on": (True,), "both": (False, True)}[args.torch_cuda_graph]:
                        r.run("torch", wl.name, train_step.torch_train, wl, steps=args.steps, warmup=args.warmup,
                              compile=compile, seed=args.seed, cuda_graph=graph)
            if "jax" in fws:
                for scan in {"on": (True,), "off": (False,), "both": (True, False)}[args.jax_scan]:
                    r.run("jax", wl.name, train_step.jax_train, wl, steps=args.steps, warmup=args.warmup,
                          remat=args.jax_remat, scan_layers=scan, seed=args.seed)
    if "trainer" in args.sections:
        from bench import trainer, train_step
        for preset in args.presets:
            wl = train_step.train_workload(preset, q)
            for fw in fws:
                for compile in (compiles if fw == "torch" else (False,)):
                    r.run(fw, wl.name, trainer.trainer_train, fw, wl, steps=args.steps, warmup=args.warmup,
                          out=args.out, compile=compile)
    if "deepspeed" in args.sections and "torch" in fws:
        from bench import deepspeed_step, train_step
        for preset in args.presets:
            wl = train_step.train_workload(preset, q)
            for compile in compiles:
                r.run("torch+deepspeed", wl.name, deepspeed_step.deepspeed_train, wl, steps=args.steps,
                      warmup=args.warmup, optimizer=args.ds_optimizer, compile=compile, seed=args.seed)
    if "decode" in args.sections:
        from bench import decode
        if "torch" in fws:
            for compile in compiles:
                r.run("torch", "decode b1", decode.torch_decode, args.decode_preset, quick=q, steps=args.decode_steps,
                      warmup=1, compile=compile, seed=args.seed)
        if "jax" in fws:
            r.run("jax", "decode b1", decode.jax_decode, args.decode_preset, quick=q, steps=args.decode_steps,
                  warmup=1, seed=args.seed)
    if "loss" in args.sections:
        from bench import loss
        if "torch" in fws:
            r.run("torch", "loss chunked", loss.torch_loss, "bench", quick=q, steps=args.steps, warmup=args.warmup,
                  seed=args.seed)
        if "jax" in fws:
            r.run("jax", "loss chunked", loss.jax_loss, "bench", quick=q, steps=args.steps, warmup=args.warmup,
                  seed=args.seed)
    if "peer-train" in args.sections:
        from bench import peer, train_step
        for preset in args.presets:
            wl = train_step.train_workload(preset, q)
            for compile in compiles:
                r.run("peer", wl.name, peer.peer_train, wl, steps=args.steps, warmup=args.warmup, compile=compile,
                      seed=args.seed)
    if "titan-train" in args.sections:
        from bench import peer_torchtitan, train_step
        for preset in args.presets:
            wl = train_step.train_workload(preset, q)
            for compile in compiles:
                r.run("peer", wl.name, peer_torchtitan.titan_train, wl, steps=args.steps, warmup=args.warmup,
                      compile=compile, seed=args.seed)
    if "peer-decode" in args.sections:
        from bench import peer
        r.run("peer", "decode b1", peer.peer_decode, args.decode_preset, quick=q, steps=args.peer_decode_steps,
              warmup=1, seed=args.seed)
    if "kernels" in args.sections:
        from bench import library_kernels
        for preset in args.presets:
            for kernel in library_kernels.KERNELS:
                r.run("torch vs libraries", f"kernel {kernel} {preset}", library_kernels.kernel_rows, kernel, preset,
                      quick=q, steps=args.steps, warmup=args.warmup, seed=args.seed)
    if "parity" in args.sections:
        from bench import train_step
        r.run("torch vs jax", "parity bf16", train_step.parity_bf16, "tiny", quick=q, seed=args.seed)

    # The MFU denominator: measured once per framework per results directory (or on request).
    if "dense" not in args.sections:
        for fw in _frameworks_used(args):
            if args.dense == "always" or (args.dense == "auto" and results.dense(fw) is None):
                r.run(fw, "dense", _dense_row, results, fw, q)
    return r


def _frameworks_used(args) -> list[str]:
    used = set()
    framework_sections = {"dense", "gemm", "train", "trainer", "decode", "loss"}
    if set(args.sections) & framework_sections:
        used |= set(args.frameworks)
    if set(args.sections) & {"deepspeed", "peer-train", "titan-train", "peer-decode", "kernels", "parity"}:
        used.add("torch")
    if "parity" in args.sections:
        used.add("jax")
    return sorted(used)


def _dense_row(results, framework: str, quick: bool):
    """Measure the dense bf16 rate, store it as the framework's MFU denominator; no table row."""
    from bench.mfu import DENSE_N, measure_dense_tflops
    from bench.timing import log
    n = 512 if quick else DENSE_N
    tflops = measure_dense_tflops(framework, n=n, samples=3 if quick else 7, reps=3 if quick else 10,
                                  warm_s=0.1 if quick else 0.5)
    results.set_dense(framework, tflops)
    log(f"   dense bf16 {n}^3 ({framework}): {tflops:.1f} TFLOP/s")
    return []


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--what", "data"]:  # the data-preparation benchmark (CPU), with its own flags
        from bench import data
        return data.main(argv[2:])
    if argv[:2] == ["--what", "quality"]:  # time to quality: whole training runs, with their own flags
        from bench import time_to_quality
        from blues.cli import run_main
        return run_main(time_to_quality.main, argv[2:], prog=time_to_quality.PROG)
    args = parse_args(argv)
    from bench.report import Results, print_table
    if args.report_only:
        print_table(args.out, compact=args.table == "compact", merge=[m for m in args.merge.split(",") if m],
                    show=args.table != "none")
        return 0
    # Two frameworks on one GPU in one process: JAX must not grab 75% of the memory up front.
    if len(_frameworks_used(args)) > 1:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    results = Results(args.out, argv)
    runner = run_sections(args, results)
    if args.table != "none":
        print(flush=True)
    print_table(args.out, compact=args.table == "compact", show=args.table != "none")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
