"""One small tokenizer interface over SentencePiece models and Hugging Face tokenizers.

``load_tokenizer(path)`` accepts
  * a SentencePiece ``.model`` file, or
  * a Hugging Face tokenizer directory (with ``tokenizer.json``; a directory without it is
    loaded through ``transformers.AutoTokenizer`` and its fast backend is used), or a
    ``tokenizer.json`` file directly.

The returned object also satisfies what megatron-core's GPT datasets read from a tokenizer
(``vocab_size``, ``eod`` and ``unique_identifiers`` for the index-cache hash). It deliberately has
no ``pad`` attribute: megatron then pads short samples with -1, which can never collide with a
real token id in the data.

Encoding never adds BOS/EOS or other template tokens: preprocessing decides where EOD goes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from megatron_ext.data.errors import DataError

# Tried in order when tokenizer_config.json names no eos_token.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _sha256_of(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Common interface; use ``load_tokenizer`` to get one."""

    path: str
    vocab_size: int  # unpadded: max token id + 1, special tokens included
    eod: int  # end-of-document token id
    pad_id: int | None  # the tokenizer's own pad token, if it has one (not used by megatron)
    kind: str
    sha256: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in this process (single-threaded; parallelism is the caller's)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` (for a special token: its name)."""
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        # megatron-core json-dumps config.tokenizer through this attribute to hash its index
        # caches. Content hash, not path: a retrained tokenizer is a cache miss, a copied one not.
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
            ]
        )

    def __reduce__(self) -> tuple:
        # Pickle by path (DataLoader workers under spawn, multiprocessing): cheap and portable.
        return (load_tokenizer, (self.path,))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod})"
        )


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (the ``tokenizers`` library backend)."""

    kind = "huggingface"

    def __init__(self, path: str) -> None:
        self.path = path
        directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
        json_path = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        config = _read_tokenizer_config(directory)
        if os.path.isfile(json_path):
            from tokenizers import Tokenizer as RustTokenizer

            try:
                self._tok = RustTokenizer.from_file(json_path)
            except Exception as err:  # the library raises a bare Exception on bad JSON
                raise DataError(f"cannot load Hugging Face tokenizer {json_path}: {err}") from err
            self.sha256 = _sha256_of([json_path])
        else:
            self._tok = _backend_via_transformers(path)
            files = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if os.path.isfile(os.path.join(path, name))
            )
            self.sha256 = _sha256_of(files)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"tokenizer {path} has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        self.eod = self._find_special(config.get("eos_token"), EOD_CANDIDATES, "end-of-document")
        pad = _token_content(config.get("pad_token"))
        self.pad_id = self._tok.token_to_id(pad) if pad else self._tok.token_to_id("<pad>")

    def _find_special(self, configured: Any, candidates: Sequence[str], what: str) -> int:
        names = [_token_content(configured)] if configured else []
        for name in [*names, *candidates]:
            token_id = self._tok.token_to_id(name) if name else None
            if token_id is not None:
                return token_id
        raise DataError(
            f"tokenizer {self.path} has no {what} token (looked for eos_token in "
            f"tokenizer_config.json and {', '.join(candidates)})"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Preprocessing sets TOKENIZERS_PARALLELISM=false: its --workers are the parallelism.
        # encode_batch_fast (tokenizers >= 0.20) skips offsets; same ids as encode_batch.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file."""

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as err:  # OSError/RuntimeError depending on the corruption
            raise DataError(f"cannot load SentencePiece model {path}: {err}") from err
        self.sha256 = _sha256_of([path])
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise DataError(
                f"SentencePiece model {path} has no EOS token to use as end-of-document"
            )
        self.eod = eos
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = int(self._sp.piece_to_id(token))
        # SentencePiece maps unknown pieces to unk instead of failing.
        if token_id == self._sp.unk_id() and self._sp.id_to_piece(token_id) != token:
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_tokenizer_config(directory: str) -> dict:
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return {}
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {config_path}: {err}") from err
    return config if isinstance(config, dict) else {}


def _backend_via_transformers(path: str) -> Any:
    """Load a directory without tokenizer.json (e.g. vocab.json + merges.txt) via transformers."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types for unloadable directories
        raise DataError(f"{path} is not a loadable Hugging Face tokenizer dir: {err}") from err
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{path} has no fast (Rust) tokenizer; add a tokenizer.json")
    return backend


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece ``.model`` file or a Hugging Face tokenizer directory / json."""
    if not path:
        raise DataError("no tokenizer path given")
    if not os.path.exists(path):
        raise DataError(f"tokenizer not found: {path}")
    if os.path.isdir(path):
        has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
        has_config = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
        if not (has_json or has_config):
            raise DataError(
                f"{path} is not a tokenizer directory (no tokenizer.json or tokenizer_config.json)"
            )
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    raise DataError(
        f"unsupported tokenizer file {path} (expected a SentencePiece .model file, a tokenizer.json"
        " or a Hugging Face tokenizer directory)"
    )

