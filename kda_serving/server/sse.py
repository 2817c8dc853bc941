"""Server-sent events, and noticing a client that leaves while we generate for it.

OpenAI streams are `data: <json>\\n\\n` events ending with `data: [DONE]\\n\\n`. When the client disconnects,
the task producing the events must be cancelled so that the generator's `finally` aborts the engine requests.
Starlette's StreamingResponse does that only for servers announcing ASGI spec < 2.4 (after that it relies on a
failing `send`, which uvicorn's h11 server never raises: it drops writes to a closed connection). This response
always races the stream against `http.disconnect`, whatever the server announces.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is cancelled when the client disconnects.

    on_close: called once the response is over, however it ended (sent, failed, the client gone, cancelled),
    even when the body never started, so an un-started generator's `finally` (which never runs) is not needed
    to release what the request held.
    """

    media_type = "text/event-stream"

    def __init__(self, content, status_code: int = 200, on_close: Callable[[], None] | None = None):
        super().__init__(content, status_code=status_code, headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream_until_disconnect(receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self.stream_response(send))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watcher):
                task.cancel()
            await asyncio.gather(stream, watcher, return_exceptions=True)
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Await `work`, cancelling it if the client disconnects first (for non-streaming answers).

    Returns the result of `work`, or None when the client left (there is nobody to answer).
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)
    if work_task.cancelled():
        return None
    return work_task.result()
