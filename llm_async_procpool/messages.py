"""Every value that crosses the boundary between the app and a process of ours.

On a worker's job pipe, app to worker: a ``Job`` (one prompt, with its
conversation), preceded by a ``Context`` when the app's directory or
environment changed.

On its event pipe, worker to app, for each job: ``Chunks*``, then exactly one
of ``Done`` / ``Failed``. Instead of all that, a worker may answer
``NeedModel``: its own plugin registry does not have this model (one
registered at runtime, say), so the app sends the job again with the model
pickled.

On the socket of the zygote or of a template: ``Boot`` (to an exec'd zygote),
``Ready``, ``Fork`` and ``Forked``; a template also answers its warm-up with
``NeedModel`` or ``Warmed``.

``channel`` frames these values on pipes; ``cells`` holds what a worker reads
between two chunks (stop, backpressure), which is shared memory, not messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llm


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
    loaded: bool = True  # False: the warm-up failed, so nothing is loaded


@dataclass
class Boot:
    """What the zygote starts with; every worker and template it forks inherits it."""

    environ: dict[str, str] = field(repr=False)  # the app's, before thread knobs
    nice: int
    threads: int  # the static thread share: cores // workers
    fixed_threads: int | None  # LLM_ASYNC_POOL_THREADS, or None for auto
    cores: int
    parent: int  # the app's pid
    cells: int  # how many shared cells to map
    path: list[str] = field(default_factory=list)  # the app's sys.path
    cwd: str = ""
    preload: list[str] = field(default_factory=list)  # LLM_ASYNC_POOL_PRELOAD
    inherited: bool = False  # forked from the app: it holds the app's own classes


@dataclass
class Ready:
    """The zygote's first message: llm and its plugins are loaded (or why not)."""

    problem: str = ""


@dataclass
class Fork:
    """To the zygote or a template: fork a ``worker`` or a ``template`` that
    serves on the fds sent with this message (job and event pipes, and for a
    template its own socket)."""

    kind: str
    index: int  # its cells


@dataclass
class Forked:
    """The answer to a ``Fork``, sent with the read end of the child's status pipe."""

    pid: int


@dataclass
class Context:
    """The app's working directory and environment, sent to a worker before a
    job when they changed since its last one, so a model sees them as a
    thread would."""

    cwd: str
    environ: dict[str, str] = field(repr=False)


Event = Chunks | Done | Failed | NeedModel

#: Frame kinds, so the parent knows a terminal event even if it cannot unpickle it.
KINDS: dict[type, int] = {Chunks: 1, Done: 2, Failed: 3, NeedModel: 4}
TERMINAL_KINDS = frozenset({2, 3})

#: Exit codes a worker uses to say why it stopped serving.
EXIT_CODES = {
    70: "lost its job pipe (something in the process closed or replaced it)",
    71: "lost its event pipe (something in the process closed or replaced it)",
}
EXIT_JOB_PIPE, EXIT_EVENT_PIPE = 70, 71
