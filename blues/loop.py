"""The training loop both trainers run: one function, the framework behind a small protocol.

`train(trainer, args, step, ...)` runs optimizer steps from `step` (updates already applied) until
--max_steps, a stop signal, --stop_after, --max_minutes or --max_bad_steps consecutive non-finite steps,
and decides everything that does not depend on the framework: the learning rate of each step
(blues/schedule.py), the non-finite-step guard, metrics, the progress bar, loss spikes, and when to
evaluate and save. The framework's side (`Trainer`) launches one optimizer step, evaluates and saves.

The loop keeps one step queued ahead of the one it reads: step n + 1 is launched before step n's
losses are read (the read waits for the device), so the host loads the next batch, logs and launches
while the device computes. A non-finite update is skipped without a host decision (inside the fused
AdamW in PyTorch, inside the compiled step in JAX). The loop does not run ahead of a step whose
outcome decides something before the next one may start: an evaluation, a checkpoint, --stop_after,
the last step, a step that could reach --max_bad_steps, or any step once --max_minutes is over. A
stop signal or --max_minutes noticed while a step is queued ends the run after that step. Runs of
several processes, a DeepSpeed step that reads its gradient norm on the host (any configuration
but blues_torch/deepspeed_skip.py's) and a PyTorch run on a CPU (whose step runs as it is launched)
read every step before launching the next (`Trainer.run_ahead`): a stop signal reaches the processes
at different times, and they agree on it through the step they launch next.
The process's first step and first evaluation are logged with the seconds since it started
("first step after 12.3 s (compile included)"; scripts/time_to_first_step.py reads them).
"""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blues.metrics import MetricsLogger
from blues.schedule import learning_rate
from blues.train_args import TrainArgs
from blues.train_loop import (BadStepGuard, GracefulStop, Progress, SpikeDetector, StepTimer, TimeBudget,
                              invoked_script, log, resume_command, seconds_since_start, summary_line)


@dataclass
class StepResult:
    """What one optimizer step reports to the loop (the same on every rank / process)."""
    losses: list[float]  # loss, lm_loss, aux_loss, z_loss (means over the micro-batches and ranks)
    grad_norm: float  # before clipping
    applied: bool = True  # False: the update was skipped for a reason of the framework's own (DeepSpeed)
    stop_elsewhere: bool = False  # another rank received a stop signal
    out_of_time: bool = False  # --max_minutes, decided the same on every rank


class Trainer(Protocol):
    run_ahead: bool  # may a step be queued before the previous one is read (one process: nothing to agree on)
    # queue one optimizer step (or a skipped one); the returned function waits for it and reports it
    def launch(self, lr: float, inject_nan: bool) -> Callable[[], StepResult]: ...
    def evaluate(self, step: int) -> float: ...  # validation loss (logged, samples printed)
    def save(self, step: int) -> None: ...  # a checkpoint of the state after `step` updates
    def after_step(self) -> None: ...  # housekeeping between steps (e.g. sealing finished async saves)


def train(trainer: Trainer, args: TrainArgs, step: int, *, guard: BadStepGuard, metrics: MetricsLogger,
          stop: GracefulStop, budget: TimeBudget, tokens_per_step: int, is_main: bool) -> dict:
    """The loop; returns {"status": "done" | "stopped" | "bad", "step", "loss", "val_loss"}."""
    spikes = SpikeDetector()
    progress = Progress(args.max_steps, step, enabled=is_main)
    timer = StepTimer()
    last_loss, val_loss = None, None
    step_logged = eval_logged = False  # the first step and evaluation of this process
    queued: deque = deque()  # (lr, wait for the result) of launched steps not yet read, oldest first
    launched = step  # steps launched so far
    late_out_of_time = False  # --max_minutes was noticed with a step queued: the run ends after that step

    def may_launch() -> bool:
        if launched >= args.max_steps or late_out_of_time or stop or len(queued) >= 1 + trainer.run_ahead:
            return False
        if not queued:
            return True
        ahead = launched  # the queued step: does its outcome decide something first?
        decides = (ahead % args.eval_every == 0 or ahead % args.save_every == 0 or ahead == args.stop_after
                   or guard.consecutive + len(queued) >= args.max_bad_steps or budget.expired())
        return not decides

    try:
        while step < args.max_steps:
            if not queued:  # the first step, or the host stopped for an evaluation or a checkpoint
                timer.restart()
            while may_launch():
                lr = learning_rate(launched, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                                   max_steps=args.max_steps)
                queued.append((lr, trainer.launch(lr, (launched + 1) in args.inject_nan)))
                launched += 1
            lr, wait = queued.popleft()
            result = wait()
            if not step_logged and is_main:
                log(f"first step after {seconds_since_start():.1f} s (compile included)")
            step_logged = True
            loss, grad_norm = result.losses[0], result.grad_norm
            ok = guard.check(loss, grad_norm)
            if ok and not result.applied:  # the framework skipped an update the guard thought fine
                guard.skipped += 1
                guard.consecutive += 1
                ok = False
            if result.stop_elsewhere and not stop:
                stop.requested = "a stop signal on another rank"
            step += 1
            tps = timer.tokens_per_s(tokens_per_step)
            metrics.log_train(step=step, loss=loss, lm_loss=result.losses[1], aux_loss=result.losses[2],
                              z_loss=result.losses[3], lr=lr, grad_norm=grad_norm, tokens_per_s=tps,
                              skipped_steps=guard.skipped)
            if ok:
                last_loss = loss
                if is_main:
                    spikes.update(step, loss)
            elif is_main:
                log(f"warning: step {step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                    f"update skipped ({guard.consecutive}/{args.max_bad_steps} in a row)")
            progress.update(step, loss, tps, lr)
            trainer.after_step()
            if queued:  # a step that decides nothing (may_launch): a stop or --max_minutes waits for the queued one
                late_out_of_time |= result.out_of_time
                continue

            if guard.should_stop:
                trainer.save(step)
                return {"status": "bad", "step": step}
            out_of_time = result.out_of_time or late_out_of_time
            if out_of_time and is_main:
                log(f"--max_minutes {args.max_minutes:g} reached after step {step}: finishing the run here")
            last = step == args.max_steps or out_of_time
            if step % args.eval_every == 0 or last:
                began = seconds_since_start()
                val_loss = trainer.evaluate(step)
                if not eval_logged and is_main:
                    done = seconds_since_start()
                    log(f"first evaluation after {done:.1f} s ({done - began:.1f} s for the evaluation itself, "
                        f"compile included)")
                eval_logged = True
            if step == args.stop_after and not stop:
                stop.requested = f"--stop_after {step}"
            if stop:
                trainer.save(step)
                return {"status": "stopped", "step": step}
            if step % args.save_every == 0 or last:
                trainer.save(step)
            if out_of_time:
                break
    finally:
        progress.close()
    return {"status": "done", "step": step, "loss": last_loss, "val_loss": val_loss}


def finish(result: dict, *, script: str, argv, args: TrainArgs, stop: GracefulStop, checkpoint, guard: BadStepGuard,
           elapsed: float, first_step: int, best, is_main: bool) -> int:
    """What the run prints at its end (the main process only) and its exit status: a stopped run says
    how to resume, a run stopped by non-finite steps fails (1), a finished one prints its summary."""
    resume = resume_command(invoked_script(script), argv, args.out_dir)
    if result["status"] == "stopped":
        if is_main:
            log(f"stopped by {stop.requested} after step {result['step']}; checkpoint {checkpoint}")
            print(f"to resume: {resume}", flush=True)
        return 0
    if result["status"] == "bad":
        if is_main:
            print(f"{script}: error: stopped after {args.max_bad_steps} consecutive non-finite steps (step "
                  f"{result['step']}); the last good weights are in {checkpoint}; lower --lr or check the data, "
                  f"then resume with: {resume}", file=sys.stderr, flush=True)
        return 1
    if is_main:
        print(summary_line(first_step=first_step, steps=result["step"], elapsed=elapsed, train_loss=result["loss"],
                           val_loss=result["val_loss"], skipped=guard.skipped, checkpoint=checkpoint,
                           out_dir=args.out_dir, best=best), flush=True)
    return 0
