"""Every value that crosses the boundary between the parent and a worker.

Parent to worker: a ``Job`` (one prompt, with its conversation), framed by
``pools.process`` as an 8-byte sequence number and a cloudpickle payload.

Worker to parent, in order, for each job: ``Started`` (only when the worker
had to load the model first: the timeout restarts), ``Chunks*``, then exactly
one of ``Done`` / ``Failed``. Instead of all that, a worker may answer
``NeedModel``.
``NeedModel`` asks the parent to send the job again with the model pickled,
because the worker's own plugin registry does not know that model id.

Control, parent to worker while a job runs, goes through two shared integers
(see ``pools.process.Control``): the sequence number of a job to stop, and how
many chunks the consumer has taken (the backpressure window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llm
from llm.serialization import ResponseDict

#: Chunks a worker may have sent that the consumer has not taken yet.
WINDOW = 4096


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
    tool_results: list[llm.ToolResult]
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
    tool_calls: list[llm.ToolCall] = field(default_factory=list)
    prompt_json: Any = None
    attachments: list[llm.Attachment] = field(default_factory=list)


@dataclass
class Turn:
    """An earlier response of the conversation, as ``Response.to_dict()`` plus
    the prompt fields and state that ``to_dict()`` leaves out."""

    prompt: PromptSpec
    response: ResponseDict
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
    stream: bool
    prompt: PromptSpec
    conversation: ConversationSpec | None = None
    key: str | None = field(default=None, repr=False)
    model_blob: bytes | None = field(default=None, repr=False)


@dataclass
class Started:
    seq: int


@dataclass
class Chunks:
    seq: int
    items: list[Any]


@dataclass
class Done:
    seq: int
    state: ResponseState
    cancelled: bool = False


@dataclass
class Failed:
    seq: int
    error: BaseException
    state: ResponseState | None = None
    traceback: str = ""


@dataclass
class NeedModel:
    seq: int


Event = Started | Chunks | Done | Failed | NeedModel


class Control:
    """Two integers both sides see: the job to stop, and chunks consumed.

    The cells are a shared ``RawArray`` for a worker process (a check costs
    about 0.1 us, so the worker checks before every chunk), or a plain list
    for a thread.
    """

    def __init__(self, cells: Any):
        self.cells = cells

    def cancel(self, seq: int) -> None:
        self.cells[0] = seq

    def cancelled(self, seq: int) -> bool:
        return self.cells[0] == seq

    def consumed(self) -> int:
        return self.cells[1]

    def take(self, count: int = 1) -> None:
        self.cells[1] += count

    def reset(self) -> None:
        self.cells[1] = 0
