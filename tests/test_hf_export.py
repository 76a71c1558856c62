"""`convert_checkpoint --to hf` / `--to hf-mixtral` and HF directories as SRC (issue 25), on CPU, offline.

Models are tiny (d 32, 2 layers) but keep o200k's 200,019-token vocabulary, since the tokenizer ships
with them. Each export is loaded the way users load it (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`, HF_HUB_OFFLINE=1) and compared with `blues_torch` on the same ids.

Tolerances: logits 1e-5 absolute (the issue's bound; both sides run the same float32 operations, but
nn.Linear's `[out, in]` GEMMs accumulate in another order than Blues' `x @ W`: ~2e-6 seen); losses 1e-6
relative (a mean of float32 cross-entropies over the same logits).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may come from the network

from blues.config import BluesConfig  # noqa: E402
from blues.tokenizer import load_tokenizer  # noqa: E402
from blues_torch import BluesModel  # noqa: E402
from parity.checkpoint_read import read_source  # noqa: E402
from parity.convert import to_canonical  # noqa: E402
from blues.safetensors_io import load_export, save_export, write_safetensors  # noqa: E402
from test_convert_checkpoint import convert, one_error_line  # noqa: E402

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
EOT = 199999
BASE = dict(hidden_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1, num_layers=2,
            max_position_embeddings=64, embedding_multiplier_scale=2)
CONFIGS = {  # the presets' structure at d 32, and each optional feature
    "tiny": BluesConfig.preset("tiny").to_dict() | BASE | dict(num_attention_heads=4, num_key_value_heads=2,
                                                               head_dim=8),
    "small": BluesConfig.preset("small").to_dict() | BASE | dict(num_attention_heads=8, num_key_value_heads=2,
                                                                 head_dim=8),
    "mqa_capacity": BASE | dict(num_attention_heads=4, head_dim=8, tot_num_experts=4, chosen_num_experts=2,
                                capacity_factor=0.5),
    "softcap": BASE | dict(attn_logit_softcap=2.0, tot_num_experts=4, chosen_num_experts=2),
    "mixtral_like": BASE | dict(use_post_norms=False, normalize_router_weights=True, tot_num_experts=4,
                                chosen_num_experts=2),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


_MODELS: dict[str, tuple[BluesModel, Path]] = {}


def blues_export(root: Path, name: str, config: dict | None = None) -> tuple[BluesModel, Path]:
    """A blues_torch model (eval mode) for CONFIGS[name] and its safetensors export, made once."""
    if name not in _MODELS:
        cfg = BluesConfig.from_dict(config or CONFIGS[name])
        torch.manual_seed(len(_MODELS))
        model = BluesModel(cfg).eval()
        save_export(root / name, to_canonical(model), cfg)
        _MODELS[name] = model, root / name
    return _MODELS[name]


def hf_export(root: Path, name: str, to: str = "hf") -> Path:
    out = root / f"{name}-{to}"
    if not out.exists():
        rc, stdout, err = convert(blues_export(root, name)[1], out, "--to", to)
        assert rc == 0, err
        assert "try it: HF_HUB_OFFLINE=1 python -c" in stdout
    return out


def ids_for(cfg: BluesConfig, b: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))


# ---- the tokenizer -----------------------------------------------------------------------------

TEXTS = ["Hello, world! It's 2024.", "  The   old man\tsaid:\n\n  'no'.  ",
         "Café, naïve, Zürich, señor, Ångström", "日本語のテキストと中文，한국어",
         "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "x" * 50 + " " * 17 + "\r\n\r\n",
         "a<|endoftext|>b", "<|endoftext|>", "I'M SHOUTING, they'll've... DON'T", "\u00a0\u2003 unicode spaces\u3000"]


def test_tokenizer_ids_match_blues(root):
    tok = transformers.AutoTokenizer.from_pretrained(hf_export(root, "tiny"))
    blues = load_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (EOT, EOT, blues.n_vocab)
    for text in TEXTS:
        ids = blues.encode(text)  # encode_ordinary: "<|endoftext|>" inside a text is plain text
        assert tok(text)["input_ids"] == [EOT, *ids], text  # <|endoftext|> starts it, as Blues starts a document
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == blues.decode(ids) == text
    assert EOT not in tok("a<|endoftext|>b", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(EOT) == "<|endoftext|>" and tok.convert_ids_to_tokens(200018) == "<|endofprompt|>"
    assert tok.decode([EOT, *blues.encode("hi")], skip_special_tokens=True) == "hi"


# ---- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_losses_match_blues_torch(root, name):
    model, _ = blues_export(root, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_export(root, name), trust_remote_code=True)
    assert type(hf).__name__ == "BluesForCausalLM" and not hf.training
    ids = ids_for(model.config)
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # Blues' shift
    with torch.no_grad():
        ref = model(ids, targets)
        out = hf(ids, labels=labels, output_router_logits=True)
        plain = hf(ids, labels=labels)
    if model.config.capacity_factor is not None:
        assert int(ref.dropped.sum()) > 0  # the capacity rule is exercised
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(plain.loss, ref.lm_loss, rtol=1e-6, atol=0)  # labels -> the LM loss
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)  # + Blues' router losses
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.z_loss, ref.z_loss, rtol=1e-6, atol=0)
    assert len(out.router_logits) == model.config.num_layers
    for layer, logits in enumerate(out.router_logits):  # Mixtral's form: [B*T, E] per layer
        torch.testing.assert_close(logits.softmax(-1).view_as(ref.router_probs[layer]), ref.router_probs[layer],
                                   rtol=0, atol=1e-6)


def test_round_trip_is_bit_exact(root, tmp_path):
    model, _ = blues_export(root, "softcap")
    canonical = to_canonical(model)
    src = hf_export(root, "softcap")
    for to in ("safetensors", "torch", "jax"):
        rc, _, err = convert(src, tmp_path / to, "--to", to)
        assert rc == 0, err
        arrays = load_export(tmp_path / to)[0] if to == "safetensors" else read_source(tmp_path / to).arrays
        assert arrays.keys() == canonical.keys()
        for k, a in canonical.items():
            assert arrays[k].tobytes() == a.tobytes(), (to, k)
    rc, _, err = convert(tmp_path / "safetensors", tmp_path / "again", "--to", "hf")
    assert rc == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_generate_with_cache_matches_generate_py(root):
    model, export = blues_export(root, "tiny")
    out = hf_export(root, "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The old man said"
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(export), "--prompt", prompt,
                           "--max_length", "32", "--temperature", "0", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = json.loads(proc.stdout.strip().splitlines()[-1])["completion_ids"]
    enc = tok(prompt, return_tensors="pt")
    got = hf.generate(**enc, do_sample=False, max_new_tokens=32)[0, enc["input_ids"].shape[1]:].tolist()
    assert got == want and len(want) > 1

    # The cache: decoding the last token on a cached prefix gives the full forward's logits, and a
    # left-padded batch decodes each row as it would alone.
    ids = ids_for(model.config, t=12)
    with torch.no_grad():
        full = hf(ids).logits[:, -1]
        prefix = hf(ids[:, :-1], use_cache=True)
        assert prefix.cache.get_seq_length() == 11
        step = hf(ids[:, -1:], cache=prefix.cache).logits[:, -1]
    assert (step - full).abs().max().item() <= 1e-5
    tok.padding_side = "left"
    prompts = [prompt, "Once upon a time, in a land far away"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    rows = hf.generate(**batch, do_sample=False, max_new_tokens=8)[:, batch["input_ids"].shape[1]:].tolist()
    for p, row in zip(prompts, rows):
        one = tok(p, return_tensors="pt")
        assert row == hf.generate(**one, do_sample=False, max_new_tokens=8)[0, one["input_ids"].shape[1]:].tolist()

    text = transformers.pipeline("text-generation", model=str(out), trust_remote_code=True)(
        prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)


# ---- Mixtral -----------------------------------------------------------------------------------

def test_mixtral_export_matches_where_allowed(root):
    model, _ = blues_export(root, "mixtral_like")
    out = hf_export(root, "mixtral_like", "hf-mixtral")
    assert not list(out.glob("*.py"))  # no remote code
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(mixtral) is transformers.MixtralForCausalLM
    ids = ids_for(model.config)
    with torch.no_grad():
        diff = (mixtral(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("field, value", [("use_post_norms", True), ("attn_logit_softcap", 30.0),
                                          ("capacity_factor", 1.25), ("normalize_router_weights", False)])
def test_mixtral_refuses_what_it_cannot_express(root, tmp_path, field, value):
    _, src = blues_export(root, f"mixtral-{field}", CONFIGS["mixtral_like"] | {field: value})
    rc, _, err = convert(src, tmp_path / "out", "--to", "hf-mixtral")
    assert rc == 2 and one_error_line(err, f"config field '{field}'"), err
    assert os.listdir(tmp_path) == []


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_one_line_nothing_written(root, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    write_safetensors(llama / "model.safetensors", {"model.embed_tokens.weight": np.zeros((4, 2), np.float32)},
                      metadata={"format": "pt"})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    hf = hf_export(root, "tiny")
    cases = [  # (SRC, OUT, exit status, what the one line says)
        (tmp_path / "notes.txt", tmp_path / "o1", 2, "not a Blues checkpoint"),  # as for every other --to
        (llama, tmp_path / "o2", 2, "is a Hugging Face 'llama' model, not a Blues one"),
        (hf_export(root, "mixtral_like", "hf-mixtral"), tmp_path / "o3", 2, "'mixtral' model"),
        (hf, taken, 2, "already exists"),
    ]
    for src, out, status, message in cases:
        before = set(os.listdir(tmp_path))
        rc, _, err = convert(src, out, "--to", "hf")
        assert rc == status and one_error_line(err, message), (src, rc, err)
        assert set(os.listdir(tmp_path)) == before and os.listdir(taken) == ["file"]
