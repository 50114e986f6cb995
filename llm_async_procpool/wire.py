"""How llm objects become ``messages`` values and back.

Parent side: ``encode_job`` turns the ``Prompt`` and ``AsyncConversation`` an
async twin receives into a ``Job``; ``dumps_job`` pickles it, naming the part
that cannot be pickled; ``apply_state`` copies what the sync model did to its
``response`` onto the parent's ``AsyncResponse``; ``AppContext`` is the app's
directory and environment, as a worker takes them on.

Worker side: ``decode_job`` rebuilds a sync ``Prompt``, ``Response`` and
``Conversation`` for the worker's own model; ``capture_state`` reads back what
``execute()`` set on that response. (Exceptions cross in ``faults``.)

Earlier turns use llm's own ``Response.to_dict()`` / ``from_dict()`` and
``Message.to_dict()`` where the installed llm has them (0.32 and later); the
prompt fields those leave out travel alongside. Older releases (0.30, 0.31)
lack them, and prompts' ``messages`` and ``hide_reasoning`` too: there a turn
travels as its text.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import uuid
from typing import Any

import cloudpickle
import llm

from . import channel
from .errors import PromptNotSendable
from .faults import picklable
from .messages import (
    Context,
    ConversationSpec,
    Job,
    PromptSpec,
    ResponseState,
    Turn,
)

#: What the installed llm offers (the parent and its workers share one install).
HAS_TO_DICT = hasattr(llm.Response, "to_dict") and hasattr(llm, "Message")
PROMPT_PARAMETERS = frozenset(inspect.signature(llm.Prompt.__init__).parameters)
TOKEN = "_llm_async_pool_token"


# ---------------------------------------------------------------- parent side
def model_identity(model: llm.Model) -> tuple[str, str]:
    """(key, class name) of a model object: its id, plus a token stored on its
    class, so a class registered again under the same id gets a new key."""
    cls = type(model)
    token = cls.__dict__.get(TOKEN)
    if token is None:
        token = uuid.uuid4().hex[:12]
        try:
            setattr(cls, TOKEN, token)
        except (TypeError, AttributeError):
            token = f"id{id(cls):x}"
    name = f"{cls.__module__}.{cls.__qualname__}"
    return f"{model.model_id}\0{name}#{token}", name


def key_model_id(key: str) -> str:
    """The model id in a key from ``model_identity``."""
    return key.split("\0", 1)[0]


class AppContext:
    """The app's directory and environment, as a ``Context`` that is a new
    object only when they changed (so a worker is sent one only then)."""

    def __init__(self):
        self._environ: Any = None
        self._context: Context | None = None

    def __call__(self) -> Context:
        cwd = os.getcwd()
        raw = getattr(os.environ, "_data", os.environ)  # cheap to compare
        context = self._context
        if context is None or context.cwd != cwd or raw != self._environ:
            self._environ = dict(raw)
            context = self._context = Context(cwd, dict(os.environ))
        return context


def encode_job(
    model: llm.Model,
    prompt: llm.Prompt,
    stream: bool,
    conversation: llm.AsyncConversation | None,
    key: str | None,
) -> Job:
    model_key, model_class = model_identity(model)
    return Job(
        seq=0,
        model_id=model.model_id,
        model_key=model_key,
        model_class=model_class,
        class_id=id(type(model)),
        stream=stream,
        prompt=_encode_prompt(prompt),
        conversation=None if conversation is None else _encode_conversation(conversation),
        key=key,
    )


def _encode_conversation(conversation: llm.AsyncConversation) -> ConversationSpec:
    history = []
    for earlier in conversation.responses:
        if HAS_TO_DICT:
            data = dict(earlier.to_dict())
            data.pop("prompt", None)  # carried, complete, by Turn.prompt
        else:
            data = {"id": earlier.id, "text": "".join(str(c) for c in earlier._chunks)}
        history.append(Turn(_encode_prompt(earlier.prompt), data, capture_state(earlier)))
    loaded = getattr(conversation, "loaded_messages", None)
    return ConversationSpec(
        id=conversation.id,
        name=conversation.name,
        history=history,
        loaded_messages=None if loaded is None else [m.to_dict() for m in loaded],
    )


def _encode_prompt(prompt: llm.Prompt) -> PromptSpec:
    explicit = getattr(prompt, "_explicit_messages", None)
    return PromptSpec(
        prompt=prompt._prompt,
        fragments=list(prompt.fragments or []),
        system=prompt._system,
        system_fragments=list(prompt.system_fragments or []),
        attachments=[_absolute(attachment) for attachment in prompt.attachments],
        prompt_json=prompt.prompt_json,
        options=prompt.options,
        schema=prompt.schema,
        tools=[_strip_tool(tool) for tool in prompt.tools],
        tool_results=[_plain_tool_result(result) for result in prompt.tool_results],
        messages=None if explicit is None else [m.to_dict() for m in explicit],
        hide_reasoning=getattr(prompt, "hide_reasoning", False),
    )


def _absolute(attachment: llm.Attachment) -> llm.Attachment:
    """A relative path resolves against the app's directory now, when the
    prompt is made, as it would in a thread; the worker may be elsewhere."""
    path = attachment.path
    if path and not os.path.isabs(path) and dataclasses.is_dataclass(attachment):
        return dataclasses.replace(attachment, path=os.path.abspath(path))
    return attachment


def _strip_tool(tool: Any) -> Any:
    """The worker only describes tools to the model; the parent runs them."""
    if isinstance(tool, llm.Tool):
        return llm.Tool(
            name=tool.name,
            description=tool.description,
            input_schema=tool.input_schema,
            plugin=tool.plugin,
        )
    return tool  # a ServerSideTool: a configuration object, sent as is


def _plain_tool_result(result: Any) -> Any:
    exception = result.exception
    if exception is not None and not picklable(exception):
        exception = Exception(f"{type(exception).__name__}: {exception}")
    return dataclasses.replace(result, instance=None, exception=exception)


def dumps_job(job: Job) -> bytes:
    """Pickle a job; on failure say which part of the prompt is at fault."""
    try:
        return channel.dumps(job)
    except Exception as error:
        culprit, cause = _find_unpicklable(job) or ("the prompt", error)
        raise PromptNotSendable(
            f"Cannot send the prompt for model {job.model_id!r} to a worker "
            f"process: {culprit} cannot be pickled ({type(cause).__name__}: "
            f"{cause}). Pass picklable values, or set LLM_ASYNC_POOL=thread "
            "to run this model in-process."
        ) from None


def dumps_with_model(job: Job, model: llm.Model) -> bytes:
    """The job with the model itself, for a worker whose registry lacks it
    (a model registered at runtime)."""
    try:
        job.model_blob = cloudpickle.dumps(model)
        return dumps_job(job)
    except PromptNotSendable:
        raise
    except Exception as error:
        raise PromptNotSendable(
            f"Model {job.model_id!r} is not installed as a plugin where the worker can "
            f"load it, and it cannot be pickled either ({type(error).__name__}: {error}). "
            "Install its plugin, or set LLM_ASYNC_POOL=thread."
        ) from None
    finally:
        job.model_blob = None


def _find_unpicklable(job: Job) -> tuple[str, Exception] | None:
    spec = job.prompt
    options = spec.options
    pairs = options.items() if isinstance(options, dict) else options
    parts: list[tuple[str, Any]] = [(f"option {name!r}", value) for name, value in pairs]
    parts += [(f"attachment {i + 1}", a) for i, a in enumerate(spec.attachments)]
    parts += [(f"tool {getattr(t, 'name', t)!r}", t) for t in spec.tools]
    parts += [(f"tool result {r.name!r}", r) for r in spec.tool_results]
    parts += [("the schema", spec.schema), ("the fragments", spec.fragments)]
    parts += [("the conversation history", job.conversation)]
    for label, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception as error:
            return label, error
    return None


def apply_state(state: ResponseState, response: Any, tool_calls: bool = True) -> None:
    """Replay the sync model's side effects through the public response API."""
    if state.input_tokens is not None or state.output_tokens is not None or state.token_details:
        response.set_usage(
            input=state.input_tokens,
            output=state.output_tokens,
            details=state.token_details,
        )
    if state.response_json is not None:
        response.response_json = state.response_json
    if state.resolved_model is not None:
        response.set_resolved_model(state.resolved_model)
    if tool_calls:
        for call in state.tool_calls:
            response.add_tool_call(call)
    if state.prompt_json is not None:
        response._prompt_json = state.prompt_json
    if state.attachments:
        response.attachments = list(state.attachments)


# ---------------------------------------------------------------- worker side
def decode_job(
    job: Job, model: llm.Model
) -> tuple[llm.Prompt, llm.Response, llm.Conversation | None]:
    conversation = None
    spec = job.conversation
    if spec is not None:
        conversation = llm.Conversation(model=model, id=spec.id, name=spec.name)
        for turn in spec.history:
            earlier = _decode_turn(turn, model)
            earlier.conversation = conversation
            conversation.responses.append(earlier)
        if spec.loaded_messages is not None:
            conversation.loaded_messages = [llm.Message.from_dict(m) for m in spec.loaded_messages]
    prompt = _decode_prompt(job.prompt, model)
    response = llm.Response(prompt, model, job.stream, conversation=conversation, key=job.key)
    return prompt, response, conversation


def _decode_turn(turn: Turn, model: llm.Model) -> llm.Response:
    prompt = _decode_prompt(turn.prompt, model)
    if HAS_TO_DICT:
        earlier = llm.Response.from_dict(turn.response, model=model)
        earlier.prompt = prompt
        apply_state(turn.state, earlier, tool_calls=False)  # from_dict rebuilt them
        return earlier
    earlier = llm.Response(prompt, model, False)
    earlier.id = turn.response["id"]
    earlier._chunks = [turn.response["text"]]
    earlier._done = True
    apply_state(turn.state, earlier)
    return earlier


def _decode_prompt(spec: PromptSpec, model: llm.Model) -> llm.Prompt:
    options = spec.options
    if isinstance(options, dict):  # llm before 0.36 leaves "no options" as {}
        options = model.Options(**options)
    extra: dict[str, Any] = {}
    if "messages" in PROMPT_PARAMETERS:
        extra["messages"] = None
        if spec.messages is not None:
            extra["messages"] = [llm.Message.from_dict(m) for m in spec.messages]
    if "hide_reasoning" in PROMPT_PARAMETERS:
        extra["hide_reasoning"] = spec.hide_reasoning
    return llm.Prompt(
        spec.prompt,
        model,
        fragments=spec.fragments,
        attachments=spec.attachments,
        system=spec.system,
        system_fragments=spec.system_fragments,
        prompt_json=spec.prompt_json,
        options=options,
        schema=spec.schema,
        tools=spec.tools,
        tool_results=spec.tool_results,
        **extra,
    )


def capture_state(response: Any) -> ResponseState:
    return ResponseState(
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        token_details=response.token_details,
        response_json=response.response_json,
        resolved_model=getattr(response, "resolved_model", None),
        tool_calls=list(response._tool_calls),
        prompt_json=getattr(response, "_prompt_json", None),
        attachments=list(response.attachments),
    )
