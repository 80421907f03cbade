"""One-turn chat prompts in the tokenizer's own chat template (transformers'
`apply_chat_template`), with the assistant's turn opened for generation."""

from __future__ import annotations

from specattn_jax.errors import SpecAttnError


def chat_prompt(tokenizer, user: str, system: str | None = None) -> list[int]:
    """The token ids of a conversation of one user turn (after an optional system prompt),
    ending where the assistant's reply begins (`add_generation_prompt=True`).

    Raises `SpecAttnError` when the tokenizer has no chat template.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SpecAttnError(
            "the verifier's tokenizer has no chat template; leave out --chat (and --system)"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])
