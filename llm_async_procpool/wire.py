"""How llm objects become ``messages`` values and back.

Parent side: ``encode_job`` turns the ``Prompt`` and ``AsyncConversation`` an
async twin receives into a ``Job``; ``dumps_job`` pickles it, naming the part
that cannot be pickled; ``apply_state`` copies what the sync model did to its
``response`` onto the parent's ``AsyncResponse``.

Worker side: ``decode_job`` rebuilds a sync ``Prompt``, ``Response`` and
``Conversation`` for the worker's own model; ``capture_state`` reads back
what ``execute()`` set on that response.

Earlier turns use llm's own ``Response.to_dict()`` / ``from_dict()`` and
``Message.to_dict()``; the prompt fields those leave out travel alongside.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import cloudpickle
import llm

from .errors import PromptNotSendable, RemoteError
from .messages import ConversationSpec, Job, PromptSpec, ResponseState, Turn


# ---------------------------------------------------------------- parent side
def encode_job(
    model_id: str,
    prompt: llm.Prompt,
    stream: bool,
    conversation: llm.AsyncConversation | None,
    key: str | None,
) -> Job:
    return Job(
        seq=0,
        model_id=model_id,
        stream=stream,
        prompt=_encode_prompt(prompt),
        conversation=None if conversation is None else _encode_conversation(conversation),
        key=key,
    )


def _encode_conversation(conversation: llm.AsyncConversation) -> ConversationSpec:
    history = []
    for earlier in conversation.responses:
        data = dict(earlier.to_dict())
        data.pop("prompt", None)  # carried, complete, by Turn.prompt
        history.append(Turn(_encode_prompt(earlier.prompt), data, capture_state(earlier)))
    loaded = conversation.loaded_messages
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
        attachments=list(prompt.attachments),
        prompt_json=prompt.prompt_json,
        options=prompt.options,
        schema=prompt.schema,
        tools=[_strip_tool(tool) for tool in prompt.tools],
        tool_results=[_plain_tool_result(result) for result in prompt.tool_results],
        messages=None if explicit is None else [m.to_dict() for m in explicit],
        hide_reasoning=prompt.hide_reasoning,
    )


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


def _plain_tool_result(result: llm.ToolResult) -> llm.ToolResult:
    exception = result.exception
    if exception is not None and not _picklable(exception):
        exception = Exception(f"{type(exception).__name__}: {exception}")
    return dataclasses.replace(result, instance=None, exception=exception)


def dumps_job(job: Job) -> bytes:
    """Pickle a job; on failure say which part of the prompt is at fault.

    The C pickler is three times faster; cloudpickle is needed only for what
    pickle cannot do, or does by a reference to ``__main__`` (a notebook's
    class, say) that a worker could not resolve.
    """
    try:
        data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    try:
        return cloudpickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        culprit, cause = _find_unpicklable(job) or ("the prompt", error)
        raise PromptNotSendable(
            f"Cannot send the prompt for model {job.model_id!r} to a worker "
            f"process: {culprit} cannot be pickled ({type(cause).__name__}: "
            f"{cause}). Pass picklable values, or set LLM_ASYNC_POOL=thread "
            "to run this model in-process."
        ) from None


def _find_unpicklable(job: Job) -> tuple[str, Exception] | None:
    spec = job.prompt
    parts: list[tuple[str, Any]] = [(f"option {name!r}", value) for name, value in spec.options]
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


def apply_state(state: ResponseState, response: Any) -> None:
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
            earlier = llm.Response.from_dict(turn.response, model=model)
            earlier.prompt = _decode_prompt(turn.prompt, model)
            apply_state(turn.state, earlier)
            earlier.conversation = conversation
            conversation.responses.append(earlier)
        if spec.loaded_messages is not None:
            conversation.loaded_messages = [llm.Message.from_dict(m) for m in spec.loaded_messages]
    prompt = _decode_prompt(job.prompt, model)
    response = llm.Response(prompt, model, job.stream, conversation=conversation, key=job.key)
    return prompt, response, conversation


def _decode_prompt(spec: PromptSpec, model: llm.Model) -> llm.Prompt:
    messages = None
    if spec.messages is not None:
        messages = [llm.Message.from_dict(m) for m in spec.messages]
    return llm.Prompt(
        spec.prompt,
        model,
        fragments=spec.fragments,
        attachments=spec.attachments,
        system=spec.system,
        system_fragments=spec.system_fragments,
        prompt_json=spec.prompt_json,
        options=spec.options,
        schema=spec.schema,
        tools=spec.tools,
        tool_results=spec.tool_results,
        messages=messages,
        hide_reasoning=spec.hide_reasoning,
    )


def capture_state(response: Any) -> ResponseState:
    return ResponseState(
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        token_details=response.token_details,
        response_json=response.response_json,
        resolved_model=response.resolved_model,
        tool_calls=list(response._tool_calls),
        prompt_json=getattr(response, "_prompt_json", None),
        attachments=list(response.attachments),
    )


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True


def portable_error(error: BaseException, traceback_text: str) -> BaseException:
    """The error itself if it survives a pickle round trip, else a RemoteError."""
    if _picklable(error):
        return error
    return RemoteError(type(error).__name__, str(error), traceback_text)
