"""The run's SentencePiece tokenizer as transformers tokenizer files, for `zoo export-hf`.

    write_hf_tokenizer(Tokenizer.load(run_dir), "hf/out", model_max_length=spec.model.max_seq_len)
    AutoTokenizer.from_pretrained("hf/out").encode(text) == Tokenizer.load(run_dir).encode(text)

transformers' own SentencePiece conversion (`SpmConverter.build_tokenizer_from_spm_proto`: BPE merges
ranked by piece score, byte fallback, the normalizer spec as SentencePiece applies it; for the zoo's
models, identity normalization and no dummy prefix) gives a `tokenizers` BPE that encodes every text
to the SentencePiece ids and decodes them back to the same text; tests/test_hf_tokenizer.py checks
it on samples of the shared corpora. It is saved as `tokenizer.json` + `tokenizer_config.json`, which
`AutoTokenizer` loads as a fast tokenizer with nothing else.

Special tokens as the zoo uses them: no BOS (a document starts after an EOS, and nothing is added to
an encoding), EOS `</s>`, and padding with `<unk>`, the id `zoo eval` pads with (byte fallback means
no text encodes to it, so a pad never stands for a real token, and an EOS masked as padding is never
one the model should learn). `split_special_tokens` keeps text such as "</s>" as the characters it
is, as SentencePiece encodes it, not the EOS id.
"""

from __future__ import annotations

from pathlib import Path

from zoo.tokenizer import Tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """config.json's bos/eos/pad ids for a model that uses `tokenizer`."""
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.unk_id}


def hf_tokenizer(tokenizer: Tokenizer, *, model_max_length: int):
    """A transformers fast tokenizer (PreTrainedTokenizerFast) that encodes as `tokenizer` does."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto)
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    unk, eos = proto.pieces[tokenizer.unk_id].piece, proto.pieces[tokenizer.eos_id].piece
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token=eos, unk_token=unk, pad_token=unk,
        split_special_tokens=True, clean_up_tokenization_spaces=False, model_max_length=model_max_length,
    )


def write_hf_tokenizer(tokenizer: Tokenizer, path: str | Path, *, model_max_length: int) -> list[str]:
    """Save `hf_tokenizer(tokenizer)` into `path`; the names of the files written."""
    return sorted(Path(name).name for name in
                  hf_tokenizer(tokenizer, model_max_length=model_max_length).save_pretrained(str(path)))
