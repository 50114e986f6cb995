"""Every value that crosses the boundary between the parent and a worker.

Parent to worker: a ``Job`` (one prompt, with its conversation).

Worker to parent, for each job: ``Chunks*``, then exactly one of ``Done`` /
``Failed``. Instead of all that, a worker may answer ``NeedModel``: its own
plugin registry does not have this model (one registered at runtime, say), so
the parent sends the job again with the model pickled.

A template process (``template``) answers its warm-up with ``Warmed``.

Control, parent to worker while a job runs, goes through shared integers
(``Control``): the job to stop, and how many chunks and bytes the consumer
has taken (the backpressure window). ``channel`` frames these values on pipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llm

#: Chunks a worker may have sent that the consumer has not taken yet.
WINDOW = 4096
#: Bytes of pickled chunks a worker may have sent that the consumer has not taken yet.
WINDOW_BYTES = 16 * 2**20


@dataclass
class PromptSpec:
    """What a sync model reads from ``llm.Prompt``; tools carry no implementation."""

    prompt: str | None
    fragments: list[str]
    system: str | None
    system_fragments: list[str]
    attachments: list[llm.Attachment]
    prompt_json: str | None
    options: llm.Options
    schema: dict | None
    tools: list[Any]
    tool_results: list[Any]
    messages: list[dict] | None
    hide_reasoning: bool


@dataclass
class ResponseState:
    """What a sync model may set on ``response`` besides its chunks."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    token_details: dict | None = None
    response_json: Any = None
    resolved_model: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    prompt_json: Any = None
    attachments: list[llm.Attachment] = field(default_factory=list)


@dataclass
class Turn:
    """An earlier response of the conversation: ``Response.to_dict()`` (or its
    text, on llm releases without it) plus what ``to_dict()`` leaves out."""

    prompt: PromptSpec
    response: dict
    state: ResponseState


@dataclass
class ConversationSpec:
    """What a sync model may read from ``conversation``: its earlier turns, or
    the history ``llm -c`` read back from the logs database."""

    id: str
    name: str | None
    history: list[Turn]
    loaded_messages: list[dict] | None


@dataclass
class Job:
    seq: int
    model_id: str
    #: Which model object: the id and the identity of its class in the parent,
    #: so a model registered again under the same id is not served stale.
    model_key: str
    model_class: str
    class_id: int  # id() of the class in the parent: the same object in a forked worker
    stream: bool
    prompt: PromptSpec
    conversation: ConversationSpec | None = None
    key: str | None = field(default=None, repr=False)
    model_blob: bytes | None = field(default=None, repr=False)


@dataclass
class Chunks:
    seq: int
    items: list[Any]
    #: Size on the wire, set by the parent's reader (for the bytes window).
    nbytes: int = 0


@dataclass
class Done:
    seq: int
    state: ResponseState
    cancelled: bool = False


@dataclass
class ErrorCopy:
    """An exception that does not survive a pickle round trip, described so the
    parent can rebuild it as the same class without calling its constructor."""

    module: str
    qualname: str
    args: tuple
    attributes: dict[str, Any]
    message: str


@dataclass
class Failed:
    seq: int
    error: BaseException | ErrorCopy
    state: ResponseState | None = None
    traceback: str = ""


@dataclass
class NeedModel:
    seq: int


@dataclass
class Warmed:
    """A template's answer after its warm-up: can workers be forked from it?"""

    shareable: bool
    reason: str = ""
    threads: int = 1


Event = Chunks | Done | Failed | NeedModel

#: Frame kinds, so the parent knows a terminal event even if it cannot unpickle it.
KINDS: dict[type, int] = {Chunks: 1, Done: 2, Failed: 3, NeedModel: 4}
TERMINAL_KINDS = frozenset({2, 3})

#: Shared cells: one for the pool, then ``CELLS`` per worker.
POOL_CELLS = 8
CELLS = 4
BUSY = 0  # pool cell: how many workers are running a prompt (the thread budget)


class Control:
    """The integers a worker and its parent both see while a job runs.

    ``cells`` is a shared ``RawArray`` for worker processes (a check costs about
    0.1 us, so the worker checks before every chunk) or a plain list in-process.
    """

    def __init__(self, cells: Any, index: int = 0):
        self.cells = cells
        self.base = POOL_CELLS + index * CELLS

    def cancel(self, seq: int) -> None:
        self.cells[self.base] = seq

    def cancelled(self, seq: int) -> bool:
        return self.cells[self.base] == seq

    def taken(self) -> tuple[int, int]:
        return self.cells[self.base + 1], self.cells[self.base + 2]

    def take(self, count: int, nbytes: int = 0) -> None:
        self.cells[self.base + 1] += count
        self.cells[self.base + 2] += nbytes

    def reset(self) -> None:
        self.cells[self.base + 1] = self.cells[self.base + 2] = 0

    def mark_started(self) -> None:
        """Set by the worker once our code runs, past the interpreter's start-up."""
        self.cells[self.base + 3] = 1

    def started(self) -> bool:
        return self.cells[self.base + 3] == 1

    def clear(self) -> None:
        for offset in range(CELLS):
            self.cells[self.base + offset] = 0

    def busy(self) -> int:
        return self.cells[BUSY]


def local_cells() -> list[int]:
    """Cells for a single in-process job."""
    return [0] * (POOL_CELLS + CELLS)
