"""Text of the tokens a resumed request generates, decoded by the router.

A worker that takes over a request starts its detokenizer cold on the prompt plus the
tokens already sent; when that tail is not valid UTF-8 on its own (a character split
across tokens) it can re-emit text the client already has. The router holds every token
sent, so it decodes the continuation itself with the usual incremental window.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # tokens before the new ones that are decoded with them, for spacing
_MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens


class ContinuationText:
    def __init__(self, tokenizer, sent_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._tokens = list(sent_token_ids)
        self._read = len(self._tokens)
        # The last tokens sent may hold the first bytes of a character the old worker's
        # detokenizer had not shown yet; they are decoded again with what follows them.
        for _ in range(_MAX_CHAR_TOKENS):
            if not self._read or not self._decode(self._tokens[max(0, self._read - _CONTEXT_TOKENS) : self._read]).endswith("\ufffd"):
                break
            self._read -= 1
        self._prefix = max(0, self._read - _CONTEXT_TOKENS)
        self._stop = stop
        self._text = ""

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=self._skip_special_tokens)

    def delta(self, token_ids: list[int], finish_reason: str) -> str:
        self._tokens += token_ids
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        new_text = self._decode(self._tokens[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # An unfinished character: wait for the tokens that complete it. A stream that ends
            # on one never shows it, as vLLM's own detokenizer does not.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._tokens)
        if finish_reason == "stop" and self._stop:
            # The worker stopped on a stop string; like vLLM, leave it out of the text.
            whole = self._text + delta
            cut = min((whole.find(s) for s in self._stop if s in whole), default=len(whole))
            delta = whole[len(self._text) : cut] if cut >= len(self._text) else ""
        self._text += delta
        return delta
