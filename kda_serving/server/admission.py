"""Backpressure: at most `--max-concurrent-requests` generation requests in flight, the rest refused with a 429.

A generation request (/v1/completions, /v1/chat/completions, /v1/responses, background ones included) takes a
ticket once it has passed validation, right before its choices go to the engine, and gives it back when its
answer is over, whatever ended it: the JSON answer sent or failed, the client gone (499), the stream's response
over (sse.EventStreamResponse's `on_close`, run even when its body never started), or a background
response's task done, failed or cancelled (a done callback, run even when the task never started). Past the
limit the request is answered at once with a 429 (`Retry-After: 1`) and never reaches the engine.

Why refuse instead of queueing: the engine already queues what its batch cannot take; what this bounds is the
memory and the wait of requests nobody has room for, and a 429 tells clients (and load balancers) to back off or
go elsewhere. The official OpenAI clients retry a 429 after its Retry-After on their own.

The event loop runs one coroutine at a time, so `try_acquire`'s check and increment (no await between) are
atomic without a lock.
"""

from __future__ import annotations

from kda_serving.server.errors import APIError

RETRY_AFTER_SECONDS = 1


class Ticket:
    """One admitted request's slot; `release()` gives it back, and only the first call counts."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._admitted -= 1
            self._admission = None


class Admission:
    """Counts the admitted generation requests and refuses those past `limit` (0: no limit, counted all the same)."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def try_acquire(self) -> Ticket | None:
        if self.limit and self._admitted >= self.limit:
            return None
        self._admitted += 1
        return Ticket(self)

    def admit(self) -> Ticket:
        """A ticket, or the 429 to answer (OpenAI's shape for a request-rate limit: type "requests", code
        "rate_limit_exceeded")."""
        ticket = self.try_acquire()
        if ticket is None:
            raise APIError(429, f"The server is at its limit of {self.limit} concurrent generation requests "
                                f"(--max-concurrent-requests); retry shortly.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return ticket
