"""Turning what clients send (text, token ids, chat messages) into prompt token ids, once.

The router holds the same tokenizer as the workers, so it can validate lengths, route by
prefix and hand workers token ids instead of text.
"""

from __future__ import annotations

from pdcluster.router.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")


class PromptBuilder:
    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = len(self.tokenizer)

    def from_text(self, text: str) -> list[int]:
        # As vLLM's OpenAI server does for completions: the tokenizer's special tokens included.
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def from_token_ids(self, token_ids: list[int]) -> list[int]:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param="prompt")
        return list(token_ids)

    def from_messages(self, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}", param="messages")
        if self.tokenizer.chat_template is None:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids


def fit_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The output budget: what was asked for, or the rest of the context; never past it."""
    if prompt_len == 0:
        raise InvalidRequest("the prompt is empty", param="prompt")
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = room
    if room <= 0 or max_tokens > room:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return max_tokens
