"""o200k_base as a Hugging Face tokenizer (`tokenizer.json`), built from Blues' embedded rank file.

transformers' own `TikTokenConverter` turns the ranks into a byte-level BPE (the merges follow the
rank order; whole pre-tokens found in the vocabulary are taken as they are, as tiktoken does), with
Blues' o200k pre-tokenizer pattern. What the export adds, so that ids match Blues everywhere:

- the special tokens keep their o200k ids (`<|endoftext|>` 199999, `<|endofprompt|>` 200018) and the
  unassigned ids (199998, 200000..200017) hold reserved special tokens `<|reserved_N|>`, so the
  vocabulary is exactly the model's 200,019 rows;
- `<|endoftext|>` is bos, eos and pad (padding is masked out; pad on the left for `generate`), and the
  tokenizer puts it before every text, as Blues starts every document and prompt with it
  (`add_special_tokens=False` gives Blues' `encode` ids alone);
- `split_special_tokens`: a special token's text inside a string is ordinary text, as in Blues'
  `encode` (tiktoken's encode_ordinary), the way Blues tokenized its training data.

Loading needs tokenizers only (no tiktoken, no network). transformers and tokenizers are imported inside
the functions: they are optional (the dev extra), and Blues runs without them.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from blues import tokenizer as blues_tokenizer

ENDOFTEXT = blues_tokenizer.ENDOFTEXT


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """transformers' TikTokenConverter on the embedded (hash-checked) ranks: byte-level token strings
    -> ids, and the merges in rank order."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = blues_tokenizer.load_ranks()
    converter = TikTokenConverter(vocab_file=None, pattern=blues_tokenizer.PAT_STR)
    converter.load_tiktoken_bpe = lambda _url: ranks
    return converter.extract_vocab_merges_from_model(None)


def special_tokens() -> dict[str, int]:
    """Every id past the ranks: o200k's specials and the reserved fillers, in id order."""
    ranks_end = min(blues_tokenizer.SPECIAL_TOKENS.values()) - 1  # 199998: the first id without a rank
    named = {i: s for s, i in blues_tokenizer.SPECIAL_TOKENS.items()}
    return {named.get(i, f"<|reserved_{i}|>"): i for i in range(ranks_end, blues_tokenizer.N_VOCAB)}


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The o200k_base `tokenizers.Tokenizer` as JSON (built once per process: a few seconds)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges()
    specials = special_tokens()
    vocab.update(specials)  # at their own ids, so the added tokens below keep them
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    # TikTokenConverter.converted()'s pipeline: the o200k split, then bytes -> byte-level characters.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(blues_tokenizer.PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    eot = blues_tokenizer.SPECIAL_TOKENS[ENDOFTEXT]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{ENDOFTEXT} $A", pair=f"{ENDOFTEXT} $A {ENDOFTEXT} $B:1",
                                      special_tokens=[(ENDOFTEXT, eot)])])
    return tok.to_str()


@lru_cache(maxsize=1)
def _hf_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()), bos_token=ENDOFTEXT,
                                   eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, split_special_tokens=True,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(directory: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (transformers' own save) into `directory`."""
    hf = _hf_tokenizer()  # built once per process (~10 s), saved per export (~2 s)
    hf.model_max_length = hf.init_kwargs["model_max_length"] = model_max_length
    hf.save_pretrained(str(directory))
