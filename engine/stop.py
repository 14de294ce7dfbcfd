"""Stop strings in a stream: text is held back while it could still be the start of a stop string."""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""   # text received but not yet emitted
        self.stopped = False

    def push(self, text: str) -> str:
        """Add streamed text; return what can be shown now (never any part of a stop string)."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
