"""Text of a resumed stream: whatever token the old worker stopped at, the text the
client ends up with equals the text of the whole sequence."""

from __future__ import annotations

from pdcluster.router.continuation_text import ContinuationText

TEXT = "Café au lait — naïve façade, 東京 and emoji 🙂🚀 then plain words again."


def shown_by_old_worker(tokenizer, tokens: list[int]) -> str:
    """What an incremental detokenizer has shown: everything but an unfinished character."""
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def test_every_resume_point_gives_the_whole_text(tokenizer):
    tokens = tokenizer(TEXT, add_special_tokens=False).input_ids
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "\ufffd" not in whole and len(tokens) > len(TEXT.split())  # multi-byte characters span tokens
    for k in range(1, len(tokens)):
        sent_text = shown_by_old_worker(tokenizer, tokens[:k])
        continuation = ContinuationText(tokenizer, tokens[:k], stop=[])
        # New tokens arrive one at a time, the last with the finish reason.
        deltas = [continuation.delta([t], "length" if i == len(tokens) - 1 else "") for i, t in enumerate(tokens[k:], start=k)]
        assert sent_text + "".join(deltas) == whole, k


def test_a_stream_ending_inside_a_character_ends_as_an_uninterrupted_one(tokenizer):
    tokens = tokenizer(TEXT, add_special_tokens=False).input_ids
    end = next(n for n in range(len(tokens), 0, -1) if tokenizer.decode(tokens[:n]).endswith("\ufffd"))
    tokens = tokens[:end]  # the last character's bytes are cut short
    for k in range(1, end):
        continuation = ContinuationText(tokenizer, tokens[:k], stop=[])
        deltas = [continuation.delta([t], "length" if i == end - 1 else "") for i, t in enumerate(tokens[k:], start=k)]
        assert shown_by_old_worker(tokenizer, tokens[:k]) + "".join(deltas) == shown_by_old_worker(tokenizer, tokens), k


def test_a_stop_string_is_left_out(tokenizer):
    tokens = tokenizer(TEXT, add_special_tokens=False).input_ids
    k = len(tokens) // 2
    continuation = ContinuationText(tokenizer, tokens[:k], stop=["plain"])
    text = shown_by_old_worker(tokenizer, tokens[:k]) + continuation.delta(tokens[k:], "stop")
    assert text == TEXT[: TEXT.index("plain")]
