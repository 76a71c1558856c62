"""Training metrics: `DIR/metrics.jsonl` (one JSON object per line) and TensorBoard event files.

Record kinds, told apart by their keys:
- train: exactly `step, loss, lm_loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, skipped_steps`
  (`step` is the 1-based optimizer step; `skipped_steps` the total of non-finite steps skipped so
  far; a non-finite value is written as null, since JSON has no NaN);
- eval: `step, val_loss, val_perplexity, experts` with `experts` a list, per layer, of
  `{layer, fractions, entropy, drop_rate}` (blues.utilization).

Floats are written with Python's shortest round-trip repr, so a value read back is bit-for-bit the
value logged (the exact-resume tests compare losses this way).

On resume the logger first drops records of steps after the checkpoint (a run killed after its
last checkpoint logged steps that will be redone) and any half-written last line.

TensorBoard files are written with tensorboard's own event writer (no torch, no TensorFlow).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

TRAIN_KEYS = ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps")
EVAL_KEYS = ("step", "val_loss", "val_perplexity", "experts")


def _clean(value):
    """JSON-safe: python floats/ints, non-finite -> None, recursing into lists and dicts."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / tensor scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a metrics.jsonl (a half-written last line is ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return parse_records(lines)


def parse_records(lines) -> list[dict]:
    """The JSON records among metrics.jsonl lines (str or bytes); a line that does not parse (a
    half-written one) is skipped."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def eval_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "val_loss" in r]


class MetricsLogger:
    """Appends records to `out_dir/metrics.jsonl` and mirrors scalars to TensorBoard (`out_dir/tb`).

    `enabled=False` (every data-parallel rank but 0) makes every call a no-op. `resume_step`: drop
    records with a step after it first (see the module docstring).
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step if resume_step is not None else None)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(str(Path(out_dir) / "tb"))

    def _truncate_after(self, step: int | None) -> None:
        """Rewrite the file (atomically) keeping only complete records with step <= `step`."""
        if not self.path.exists():
            return
        raw = self.path.read_text(encoding="utf-8")
        records = read_metrics(self.path)
        keep = [r for r in records if step is None or r.get("step", 0) <= step]
        if len(keep) == len(records) and (not raw or raw.endswith("\n")):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()  # a killed run keeps every step it logged

    def log_train(self, *, step: int, loss, lm_loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s,
                  skipped_steps: int) -> None:
        if not self.enabled:
            return
        record = dict(step=int(step), loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss, lr=lr,
                      grad_norm=grad_norm, tokens_per_s=tokens_per_s, skipped_steps=int(skipped_steps))
        record = _clean(record)
        self._write(record)
        for key in TRAIN_KEYS[1:]:
            self.scalar(f"train/{key}", record[key], step)

    def log_eval(self, *, step: int, val_loss, experts: list[dict]) -> None:
        if not self.enabled:
            return
        val_loss = _clean(val_loss)
        ppl = math.exp(min(val_loss, 700.0)) if val_loss is not None else None
        self._write(dict(step=int(step), val_loss=val_loss, val_perplexity=ppl, experts=_clean(experts)))
        self.scalar("val/loss", val_loss, step)
        self.scalar("val/perplexity", ppl, step)
        for layer in experts:
            i = layer["layer"]
            self.scalar(f"experts/layer{i}/entropy", layer["entropy"], step)
            self.scalar(f"experts/layer{i}/drop_rate", layer["drop_rate"], step)
            for e, frac in enumerate(layer["fractions"]):
                self.scalar(f"experts/layer{i}/expert{e}", frac, step)

    def scalar(self, tag: str, value, step: int) -> None:
        if self._tb is None or value is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def text(self, tag: str, text: str, step: int) -> None:
        """A text summary (the sample continuations), shown in TensorBoard's Text tab."""
        if self._tb is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.plugins.text.metadata import create_summary_metadata

        tensor = TensorProto(dtype=7, string_val=[text.encode("utf-8")],  # 7 = DT_STRING
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        summary = Summary(value=[Summary.Value(tag=tag, metadata=create_summary_metadata(tag, ""), tensor=tensor)])
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
