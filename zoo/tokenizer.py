"""The SentencePiece tokenizer a run trains with, as the model's companion artifact.

training/data.py trains it (BPE, byte fallback, lossless round trip) and saves it into the run folder
as `tokenizer.model`; generation and evaluation load it from there. Plain sentencepiece, no training code.

A run folder made by `zoo import-hf` holds the source's own tokenizer files under `hf_tokenizer/`
instead: `HFTokenizer` serves them to generation and evaluation through transformers' AutoTokenizer.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch

from zoo.files import write_atomic
from zoo.host import usable_cpus

TOKENIZER_FILENAME = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"  # where `zoo import-hf` keeps the source's tokenizer inside a run folder


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer file (one line, names the path)."""


class Tokenizer:
    """A SentencePiece BPE model: `vocab_size` pieces, an EOS id, lossless encode/decode (except that
    U+2581, SentencePiece's own space symbol, decodes to a space). Saved as one .model file."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    def same_model(self, other: Tokenizer) -> bool:
        """Same pieces, scores and normalization: the files may differ only in how training ran."""
        return canonical_proto(self.model_proto) == canonical_proto(other.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # SentencePiece encodes a list on C++ threads: parallel without pickling text to processes.
        return self._sp.encode(texts, num_threads=sentencepiece_threads())

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self._sp.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.model_proto)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a .model file or a run folder holding `tokenizer.model`."""
        path = Path(path)
        path = path / TOKENIZER_FILENAME if path.is_dir() else path
        if not path.is_file():
            raise TokenizerError(f"tokenizer path {str(path)!r} does not exist; save one with Tokenizer.save(run_dir)")
        try:
            return cls(path.read_bytes())
        except RuntimeError as error:  # SentencePiece: "INTERNAL: ... ParseFromArray"
            raise TokenizerError(f"tokenizer file {str(path)!r} is not a SentencePiece model ({error}); "
                                 "restore it from the run folder it came from") from None


class HFTokenizer:
    """A Hugging Face tokenizer (the files of an imported model) with the interface generation and
    evaluation read: vocab_size, eos_id, encode (no special tokens added: generation puts EOS first, as
    for the zoo's own runs), encode_batch and decode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def eos_id(self) -> int:
        return self._tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self._tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """From a directory of tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, ...)."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TokenizerError(f"{directory} holds no tokenizer transformers can load ({first})") from None
        if tokenizer.eos_token_id is None:
            raise TokenizerError(f"the tokenizer in {directory} has no EOS token: generation and evaluation start "
                                 "every text after one; set eos_token in its tokenizer_config.json")
        return cls(tokenizer)


def canonical_proto(model_proto: bytes) -> bytes:
    """The model without `trainer_spec.num_threads`: SentencePiece records the thread count it trained
    with, so the same corpus gave different bytes on machines with different core counts (and
    `--resume` on another machine refused a run whose tokenizer was the same)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True)


def sentencepiece_threads() -> int:
    return usable_cpus()
