"""Turning generated token ids into text pieces as they come, and cutting at stop sequences.

``TextAccumulator.add(ids)`` takes all ids generated so far and returns the new text that
is safe to send: it re-decodes the whole answer (so multi-token characters and a
tokenizer's spacing rules come out as in one final ``decode``), holds back a trailing
incomplete UTF-8 character, and holds back a tail that could still become a stop
sequence. When a stop sequence appears, the text is cut before it and ``stopped`` is set
(OpenAI's semantics: the stop sequence is not part of the answer). The pieces sent,
joined, always equal ``text``, the final answer.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["TextAccumulator"]


class TextAccumulator:
    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # the answer so far (cut at a stop sequence once one is seen)
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def add(self, ids: Sequence[int], final: bool = False) -> str:
        """The next piece to send, given all ids generated so far (``final``: no more will come)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            text = text.rstrip("\ufffd")  # part of a character that the next token completes
        cut = self._first_stop(text)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        end = len(text) if (final or self.stopped) else max(self.sent, len(text) - self.hold)
        piece = text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None
