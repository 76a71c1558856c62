"""The built wheel: what it holds, and that an installed (not editable) Blues works from any directory.

The wheel is built by setuptools' own PEP 517 backend (what `pip install .` runs) from a copy of the
sources, so the checkout gets no build/ or egg-info. It is installed with pip (no dependencies) into a
fresh venv that reaches this interpreter's site-packages through a .pth file (torch, JAX, ... without
downloading them; a plain --system-site-packages venv would see the base interpreter's, not this
venv's). Every command then runs from a directory outside the checkout, with PYTHONPATH cleared, so
only the installed copy can answer.
"""
from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from oracle import random_canonical
from blues.safetensors_io import save_export
from test_generation import text_config

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "generate.py", "blues", "blues_torch", "blues_jax", "parity", "bench"]
COMMANDS = ["blues-train-torch", "blues-train-jax", "blues-generate", "blues-convert", "blues-check"]
PACKAGES = {"blues", "blues_torch", "blues_jax", "parity"}

pytestmark = pytest.mark.slow  # a wheel build, a venv and a few interpreter start-ups: ~40 s


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """(the wheel, the build's output)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-W", "default", "-c",
                          f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
                         cwd=src, capture_output=True, text=True, env=_clean_env())
    assert res.returncode == 0, res.stderr
    return out / res.stdout.strip().splitlines()[-1], res.stdout + res.stderr


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed: its bin/ directory."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    new_site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # after the new venv's own site-packages, so the installed blues wins over any editable install here
    (new_site / "zz_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = env_dir / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "--quiet", str(wheel[0])], capture_output=True, text=True, env=_clean_env())
    assert res.returncode == 0, res.stderr
    return env_dir / "bin"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_wheel_contents(wheel):
    path, log = wheel
    names = zipfile.ZipFile(path).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == PACKAGES, top  # no bench/, no top-level generate.py, no other generic names
    assert "blues/assets/o200k_base.tiktoken.gz" in names and "blues/assets/brown.csv.gz" in names
    assert "parity/generate.py" in names and "parity/hf/modeling_blues.py" in names  # subpackages too
    entry_points = zipfile.ZipFile(path).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in COMMANDS:
        assert f"{command} = parity.commands:" in entry_points
    # setuptools warns when package data sits in a directory the packages configuration misses
    warnings = [line for line in log.splitlines() if "Warning" in line or "absent from" in line]
    assert not warnings, warnings


def test_installed_api_and_commands(installed, tmp_path):
    cfg = text_config()
    save_export(tmp_path / "export", random_canonical(cfg, seed=2), cfg)
    env = _clean_env()
    script = (
        "import blues, parity.generate\n"
        "from parity.generate import load_model, sample_text\n"
        "from blues.data import DEFAULT_CORPUS\n"
        "print(blues.__file__, parity.generate.__file__, DEFAULT_CORPUS.is_file())\n"
        "model = load_model('export')\n"  # relative to the cwd
        "print(repr(sample_text(model, 'Hello', max_length=3, seed=0)))\n")
    res = subprocess.run([str(installed / "python"), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    blues_file, generate_file, corpus, *_ = res.stdout.split()
    site_dir = str(installed.parent)
    assert blues_file.startswith(site_dir) and generate_file.startswith(site_dir), res.stdout
    assert corpus == "True" and res.stdout.splitlines()[1].startswith("'Hello")

    res = subprocess.run([str(installed / "blues-generate"), "--checkpoint", "export", "--eval_text", "Hello there"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert re.match(r"--eval_text: 2 tokens, nll \d", res.stdout), res.stdout  # "Hello", " there"
    for command in ("blues-generate", "blues-convert", "blues-check"):
        res = subprocess.run([str(installed / command), "--help"], cwd=tmp_path, capture_output=True, text=True,
                             env=env)
        assert res.returncode == 0 and res.stdout.startswith("usage: "), (command, res.stderr)
    res = subprocess.run([str(installed / "blues-generate"), "--checkpoint", "missing", "--prompt", "x"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 2 and res.stderr.startswith("blues-generate: error: "), res.stderr


@pytest.mark.parametrize("command,module", [("blues-train-torch", "blues_torch/train.py"),
                                            ("blues-train-jax", "blues_jax/train.py")])
def test_installed_trainer_commands(installed, tmp_path, command, module):
    if not (REPO / module).exists():
        pytest.skip(f"{module} (the trainer's command-line module) is not in this checkout")
    res = subprocess.run([str(installed / command), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env=_clean_env())
    assert res.returncode == 0 and res.stdout.startswith("usage: "), res.stderr
