"""Stop strings: as token sequences inside the jitted loop, and as text on the host.

A stop string reaches the device loop as the token ids the tokenizer gives it alone, when
those ids decode back to exactly the string; the loop then stops a sequence right after
them, as after an EOS token. The same text can come out of other tokens (merged with its
neighbours, or with a leading-space marker), so the host also decodes the output and cuts it
after the token that completes the first stop string: a loop that ran past it costs steps,
never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

from specattn_jax.errors import SpecAttnError

StopSequences = tuple[tuple[int, ...], ...]


def check_stop_strings(stop_strings: Sequence[str] | None, tokenizer) -> tuple[str, ...]:
    """The stop strings as a tuple; refuses an empty one, or stop strings without a tokenizer."""
    if not stop_strings:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise SpecAttnError(f"stop strings must be non-empty strings, got {list(stop_strings)}")
    if tokenizer is None:
        raise SpecAttnError("stop strings need the tokenizer (pass tokenizer=...)")
    return tuple(stop_strings)


def stop_token_sequences(tokenizer, stop_strings: Sequence[str]) -> StopSequences:
    """The token ids of each stop string that the device loop can match: those whose ids,
    encoded alone, decode back to exactly the string."""
    sequences = []
    for text in stop_strings:
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        if ids and tokenizer.decode(list(ids)) == text and ids not in sequences:
            sequences.append(ids)
    return tuple(sequences)


def stop_index(tokenizer, tokens: Sequence[int], stop_strings: Sequence[str]) -> int | None:
    """The number of leading tokens whose text first contains a stop string (None if the
    whole text contains none, or there are no stop strings): the shortest such prefix, by
    bisection over prefix lengths."""
    if not stop_strings:
        return None
    decode = lambda n: tokenizer.decode(list(tokens[:n]), skip_special_tokens=True)  # noqa: E731
    if not any(s in decode(len(tokens)) for s in stop_strings):
        return None
    low, high = 0, len(tokens)  # the text of `high` tokens holds a stop string, of `low` none
    while high - low > 1:
        middle = (low + high) // 2
        if any(s in decode(middle) for s in stop_strings):
            high = middle
        else:
            low = middle
    return high


def cut_at_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> list[int]:
    """`tokens` up to and including the token that completes the first stop string."""
    end = stop_index(tokenizer, tokens, stop_strings)
    return tokens if end is None else tokens[:end]


def text_before_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string in it."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
