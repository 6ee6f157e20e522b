"""Object words -> token positions in a prompt, found with the tokenizer (never hard-coded).

The CLIP tokenizer splits text into words before BPE, so the tokens of ``prompt[:start]`` are a prefix of the
prompt's tokens: a word spanning characters [start, end) has the token positions
[lead + n(prompt[:start]), lead + n(prompt[:end])), lead = 1 for the start-of-text token. Every span is checked
against the prompt's own token ids, and an error names the word when it is missing or truncated away.
"""
from __future__ import annotations

import re

import torch


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def word_positions(tokenizer, prompt: str, words: list[str]) -> list[list[int]]:
    """Token positions (in the padded prompt the text encoder sees) of each word, in order of appearance.

    Words are matched in order (each after the previous one), whole-word and case-insensitively; a word that
    splits into several tokens gets all of them."""
    full = list(tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True).input_ids)
    lead = 1 if tokenizer.bos_token_id is not None and full and full[0] == tokenizer.bos_token_id else 0
    last = tokenizer.model_max_length - (1 if tokenizer.eos_token_id is not None else 0)
    spans, cursor = [], 0
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"object word must be a non-empty string, got {word!r}")
        m = re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE).search(prompt, cursor)
        if m is None:
            raise ValueError(f"object word {word!r} not found in prompt {prompt!r}")
        start = lead + len(_ids(tokenizer, prompt[:m.start()]))
        stop = lead + len(_ids(tokenizer, prompt[:m.end()]))
        if stop > last:
            raise ValueError(f"object word {word!r} is truncated away in prompt {prompt!r} "
                             f"(tokens {start}..{stop - 1}, the tokenizer keeps {last})")
        expected = _ids(tokenizer, prompt[:m.end()])[start - lead:]
        if stop <= start or full[start:stop] != expected:
            raise ValueError(f"object word {word!r}: its tokens do not line up in prompt {prompt!r}")
        spans.append(list(range(start, stop)))
        cursor = m.end()
    return spans


def token_weights(spans: list[list[list[int]]], seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, k, seq_len) weights: row [b, i] averages the token columns of object i of sample b (1 / n_tokens
    at each of its positions), so ``probs @ weights^T`` is the mean of the word's token maps."""
    if not spans or any(len(s) != len(spans[0]) for s in spans):
        raise ValueError("every sample needs the same number of objects")
    w = torch.zeros(len(spans), len(spans[0]), seq_len, dtype=dtype)
    for b, sample in enumerate(spans):
        for i, positions in enumerate(sample):
            if not positions or max(positions) >= seq_len:
                raise ValueError(f"sample {b}, object {i}: positions {positions} outside 0..{seq_len - 1}")
            w[b, i, positions] = 1.0 / len(positions)
    return w.to(device) if device is not None else w
