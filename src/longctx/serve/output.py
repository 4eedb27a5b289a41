"""Generated tokens to text: complete characters only, cut at the first stop string, and
never releasing text that may turn out to be the start of a stop string."""

from __future__ import annotations


class TextOutput:
    """``push(token)`` returns the text that may be sent now; ``stopped`` turns true when a
    stop string appeared (the text before it has then been released, nothing after it)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stops = stops
        self.text = ""
        self.sent = 0  # text[:sent] has been released
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text, once generation ended."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A stop string cannot start before `sent`: the text that could begin one is held back.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(self.text) - (0 if final else self._held())
        out, self.sent = self.text[self.sent:end], end
        return out

    def _held(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)
