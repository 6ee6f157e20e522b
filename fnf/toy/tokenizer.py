"""A CLIP tokenizer whose vocabulary holds every caption word of the toy world as one token.

Built from a hand-written vocab/merges pair (every lowercase letter, then left-to-right merges for each word),
so nothing is downloaded."""
from __future__ import annotations

import json
import os
import string
import tempfile

from ..families.base import tokenizer_class
from .data import WORDS

MAX_LENGTH = 16


def _bpe(word: str, merges: list[str]) -> list[str]:
    """CLIP-style BPE of one word with ``merges`` (rank = position): the symbols it ends with."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def write_tokenizer(folder: str, words=WORDS, max_length: int = MAX_LENGTH) -> str:
    """Write vocab.json, merges.txt and the tokenizer config to ``folder``; returns the folder."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"]:
        vocab.setdefault(token, len(vocab))
    for c in string.ascii_lowercase:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:
        # Append merges until BPE (lowest rank first) turns the word into one token; a merge appended later has
        # the lowest priority, so it never changes how earlier words are merged.
        while len(parts := _bpe(w, merges)) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab_path, merges_path, model_max_length=max_length, pad_token="!")
    tok.save_pretrained(folder)
    return folder


def toy_tokenizer():
    """A fresh CLIPTokenizer for the toy captions (written to a temporary folder and loaded)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        return tokenizer_class(CLIPTokenizer, d).from_pretrained(d)
