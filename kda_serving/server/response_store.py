"""The stored responses of /v1/responses: what `previous_response_id`, GET and DELETE /v1/responses/{id} read.

A response is stored (unless its request said `store: false`) with the conversation it ended: the input items
that led to it, earlier turns' included, then its own output items, each typed, with an id and a status, as
GET /v1/responses/{id}/input_items lists them and as a client may send them back as `input`. A request naming
`previous_response_id` is answered as if it had sent that conversation followed by its own input, so the
engine's prompt for the new turn starts with the tokens of the last one, and the prefix cache restores their
states instead of recomputing them (docs/cache-policy.md). As in OpenAI's API, the previous response's
`instructions` are not carried over.

Each entry keeps its whole conversation, so an entry never depends on another one and eviction cannot break
a chain; the store is bounded by the size of those conversations (their JSON text), evicting the least
recently used entries first. In memory only: a restart forgets every response.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    conversation: list[dict]  # input items, earlier turns' included, then this response's output items
    inputs: int  # how many of them are input items
    size: int  # the JSON text length both take, counted against the store's budget


class ResponseStore:
    """Responses by id, least recently used first, within `max_bytes` of JSON text (0: nothing is stored)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def put(self, body: dict, inputs: list[dict]) -> bool:
        """Stores a finished response after `inputs`, its input items (earlier turns' included); False when it
        alone exceeds the budget (then it is not kept)."""
        conversation = inputs + body["output"]
        size = len(json.dumps(body)) + len(json.dumps(conversation))
        if size > self.max_bytes:
            return False
        self.delete(body["id"])
        while self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
        self._entries[body["id"]] = StoredResponse(body, conversation, len(inputs), size)
        self._bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True
