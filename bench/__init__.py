"""The Blues benchmark harness (`python -m bench`): training, DeepSpeed, decoding, the loss and the
expert GEMMs in both frameworks, with a Hugging Face Mixtral peer in the same run.

Modules: timing (timers, peak memory), mfu (the one MFU formula and the measured dense rate),
train_step (PyTorch and JAX training steps, torch-vs-JAX parity), checks (every fast path against
its reference path), deepspeed_step, decode, loss, grouped_gemm, peer, report (rows, bench_results.json, the markdown table). Each section checks its
fast path against the reference path before it times anything; the check is a column of the table.
scripts/gpu_bench.sh runs the whole set on one GPU, one process per section.
"""
