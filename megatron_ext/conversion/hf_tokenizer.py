"""The run's tokenizer as files ``transformers.AutoTokenizer`` loads, for HF exports.

``write_tokenizer(tok, out_dir, max_length)`` writes, for
  * a Hugging Face tokenizer (``tokenizer.json`` file or directory): the tokenizer files it has
    (``tokenizer.json`` verbatim), and a ``tokenizer_config.json`` naming the class
    (``PreTrainedTokenizerFast`` unless the source names one) and the special tokens;
  * a SentencePiece ``.model``: it as ``tokenizer.model`` and a ``tokenizer_config.json`` naming
    ``LlamaTokenizer``, which transformers converts to its fast tokenizer on load;
then ``special_tokens_map.json``, loads the result with ``AutoTokenizer`` and checks it: the
end-of-document token is its ``eos_token_id`` and a probe text encodes to our ids. A differing
probe is a ConversionError for a Hugging Face source (the files are the source's own); for a
SentencePiece model it is a warning: transformers' conversion of the model's normalizer (e.g.
the default ``nmt_nfkc`` folding whitespace) can differ from the sentencepiece library's.
Returns the special token ids (bos/eos/pad) for config.json and generation_config.json.

Encoding for training never added BOS (``data.tokenizer``): the exported tokenizer config says
``add_bos_token: false`` unless the source said otherwise.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_ext.conversion.keymaps import ConversionError
from megatron_ext.data.tokenizer import SentencePieceTokenizer, Tokenizer

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Copied from a Hugging Face tokenizer directory when present (hf_io copies the same set from
# a converted checkpoint's hf/ record).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# English, Japanese, code and runs of whitespace: the demo corpus' kinds of text.
PROBE = ("The quick brown fox -- 'jumps' over the lazy dog.\n\n  Indented, twice.\n"
         "吾輩は猫である。名前はまだ無い。\n"
         "def f(x):\n    return {'a': [x, 3.14]}  # ok\n")


def write_tokenizer(tok: Tokenizer, out_dir: Path, max_length: int,
                    log: Callable[[str], None] = print) -> dict[str, int | None]:
    """Write ``tok``'s files into the existing ``out_dir`` (see the module docstring)."""
    out_dir = Path(out_dir)
    if isinstance(tok, SentencePieceTokenizer):
        shutil.copy2(tok.path, out_dir / "tokenizer.model")
        config = _sentencepiece_config(tok)
    else:
        config = _copy_hf_files(tok, out_dir)
    config.setdefault("add_bos_token", False)
    config.setdefault("add_eos_token", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    config["model_max_length"] = min(int(config.get("model_max_length") or max_length),
                                     max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if isinstance(config.get(k), (str, dict))}
    if not (out_dir / "special_tokens_map.json").is_file():
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return check_tokenizer(tok, out_dir, log)


def _copy_hf_files(tok: Tokenizer, out_dir: Path) -> dict[str, Any]:
    source = Path(tok.path)
    directory = source if source.is_dir() else source.parent
    if source.is_file():  # a tokenizer.json given directly: its directory's config, if any
        shutil.copy2(source, out_dir / "tokenizer.json")
    for name in HF_FILES:
        if source.is_dir() and (directory / name).is_file():
            shutil.copy2(directory / name, out_dir / name)
    config: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").is_file():
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{directory / 'tokenizer_config.json'}: invalid JSON "
                                  f"({e})") from None
    if not (out_dir / "tokenizer.json").is_file():  # vocab.json + merges.txt: transformers'
        raise ConversionError(f"{source}: no tokenizer.json to export (save the tokenizer "
                              "with tokenizers' Tokenizer.save and pass --tokenizer)")
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if not config.get("eos_token"):
        config["eos_token"] = tok.id_to_token(tok.eod)
    if not config.get("pad_token") and tok.pad_id is not None:
        config["pad_token"] = tok.id_to_token(tok.pad_id)
    return config


def _sentencepiece_config(tok: SentencePieceTokenizer) -> dict[str, Any]:
    import sentencepiece  # why inside: only SentencePiece exports need it

    sp = sentencepiece.SentencePieceProcessor(model_file=tok.path)  # its special-token ids
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "legacy": False}
    for key, token_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                          ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
        if token_id >= 0:
            config[key] = sp.id_to_piece(token_id)
    return config


def check_tokenizer(tok: Tokenizer, out_dir: Path, log: Callable[[str], None] = print
                    ) -> dict[str, int | None]:
    """Load ``out_dir`` with AutoTokenizer, compare it with ``tok``; its special token ids."""
    # why inside: transformers takes seconds to import; conversion without a tokenizer never
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # transformers raises many types for unloadable files
        raise ConversionError(f"the exported tokenizer does not load with AutoTokenizer: "
                              f"{type(e).__name__}: {e}") from None
    ids = {key: getattr(hf, key) for key in SPECIAL_IDS}
    if ids["eos_token_id"] != tok.eod:
        raise ConversionError(f"the exported tokenizer's eos_token_id is {ids['eos_token_id']}, "
                              f"training ended documents with {tok.eod}")
    ours, theirs = tok.encode(PROBE), hf.encode(PROBE, add_special_tokens=False)
    if ours != theirs:
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                     min(len(ours), len(theirs)))
        message = (f"AutoTokenizer on the export encodes a probe text differently from "
                   f"{tok.path} (first difference at token {where} of {len(ours)})")
        if not isinstance(tok, SentencePieceTokenizer):
            raise ConversionError(message)
        log(f"WARNING: {message}: transformers' conversion of this SentencePiece model "
            "differs from the sentencepiece library (its normalizer, most likely)")
    return ids


def generation_config(ids: dict[str, int | None]) -> dict[str, Any]:
    """generation_config.json: the token ids generation stops at and pads with."""
    config: dict[str, Any] = {"_from_model_config": True}
    config.update({k: v for k, v in ids.items() if v is not None})
    return config
