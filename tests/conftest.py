"""Test-suite wide settings.

JAX sees 8 CPU devices in every test process, so the mesh tests (data=2, expert=4) can run
without a GPU. This must be set before jax is first imported anywhere.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
