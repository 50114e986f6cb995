"""Where a waiting prompt goes: the process pool's placement policy, as pure decisions.

Every decision is an action (``Begin``, ``StartWorker``, ``StartTemplate``,
``ForkFrom``, ``Retire``) that the pool carries out; the pool then reports
what happened (a worker arrived, a model loaded, a worker is gone). Nothing
here touches a process, so every rule is tested directly
(``tests/test_placement.py``).

For a prompt for model M, in order:

1. an idle worker that has M loaded takes it: the one that served the
   prompt's conversation before, when it is idle; else one that holds no
   conversation; else the one whose conversation went quiet longest;
2. while M's first load is under way (in a worker or a template candidate),
   the prompt waits for it, so weights are downloaded once and memory never
   holds several half-loaded copies;
3. if M has a template, a worker is forked from it while there is room (an
   idle worker of another model gives up its room for it);
4. else a worker started for no model yet takes it; or a new worker starts
   (a template candidate, where M can be shared and has never loaded); or,
   at capacity, any idle worker takes it and loads M too.

Prompts wait per model, in order of arrival, and models take turns by their
oldest prompt. A decision looks at the models that have prompts waiting (a
handful), never at the whole queue, so its cost does not grow with the queue.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Placeable(Protocol):
    """A prompt, as placement sees it."""

    key: str  # its model
    seq: int  # its order of arrival
    queued: bool
    affinity: Hashable | None  # its conversation, if it continues one

    @property
    def closed(self) -> bool: ...


class Seat(Protocol):
    """A worker, as placement sees it."""

    models: set[str]  # the models it has loaded
    served: Hashable | None  # the last conversation it served


class Phase(enum.Enum):
    COLD = "cold"  # never loaded (or every copy is gone)
    LOADING = "loading"  # its first load is under way
    WARM = "warm"  # loaded somewhere at least once


@dataclass(eq=False)
class Model:
    """What placement knows of one model."""

    key: str
    phase: Phase = Phase.COLD
    loader: Any = None  # the worker or template candidate doing the first load
    template: Any = None  # a ready template
    can_share: bool = False  # the pool may load it in a template candidate
    shareable: bool | None = None  # what the last candidate found
    reason: str = ""  # why not, if not
    waiting: deque = field(default_factory=deque)  # its prompts, some maybe cancelled
    count: int = 0  # prompts in ``waiting`` still wanted
    starting: int = 0  # workers (or forks) on their way for it


@dataclass
class Begin:
    task: Any
    slot: Any
    cold: bool  # the worker loads the model first


@dataclass
class StartWorker:
    key: str


@dataclass
class StartTemplate:
    key: str
    task: Any  # the prompt whose model it loads


@dataclass
class ForkFrom:
    template: Any
    key: str


@dataclass
class Retire:
    slot: Any


Action = Begin | StartWorker | StartTemplate | ForkFrom | Retire


class Placement:
    def __init__(self, room: Callable[[int], bool]):
        self.room = room  # may one more worker start, with ``live`` alive or starting?
        self.live = 0  # workers alive or starting, template candidates included
        self.models: dict[str, Model] = {}
        self._idle: dict[Any, None] = {}  # oldest first
        self._idle_with: dict[str, dict[Any, None]] = {}

    def model(self, key: str) -> Model:
        state = self.models.get(key)
        if state is None:
            state = self.models[key] = Model(key)
        return state

    # ------------------------------------------------------------ prompts
    def submit(self, task: Placeable, can_share: bool) -> list[Action]:
        state = self.model(task.key)
        state.can_share = can_share
        task.queued = True
        state.waiting.append(task)
        state.count += 1
        return self.decide()

    def requeue(self, task: Placeable) -> list[Action]:
        """A prompt that never ran (its worker was dead when it got there) goes
        back to the front of its model's queue."""
        state = self.model(task.key)
        task.queued = True
        state.waiting.appendleft(task)
        state.count += 1
        return self.decide()

    def cancel(self, task: Placeable) -> bool:
        """Take a waiting prompt out of the queue; False if it is not waiting."""
        if not task.queued:
            return False
        task.queued = False
        self.models[task.key].count -= 1
        return True

    def waiting(self) -> list[Any]:
        """Every prompt still waiting, in no particular order."""
        return [t for m in self.models.values() for t in m.waiting if t.queued]

    def drain(self) -> list[Any]:
        """Take every waiting prompt out of the queue (the pool is shutting down)."""
        tasks = self.waiting()
        for task in tasks:
            self.cancel(task)
        for state in self.models.values():
            state.waiting.clear()
        return tasks

    # ------------------------------------------------------------ workers
    def arrived(self, slot: Seat, key: str | None) -> list[Action]:
        """A worker started for ``key`` (or a fork from its template) is ready."""
        if key is not None:
            self.model(key).starting -= 1
        return self.free(slot)

    def free(self, slot: Seat) -> list[Action]:
        """A worker has no prompt to run (new, or its prompt ended)."""
        self._idle[slot] = None
        for key in slot.models:
            self._idle_with.setdefault(key, {})[slot] = None
        return self.decide()

    def loaded(self, slot: Seat, key: str) -> list[Action]:
        """A worker's first event for ``key``: the model is loaded there."""
        slot.models.add(key)
        state = self.model(key)
        if state.loader is slot:
            state.loader, state.phase = None, Phase.WARM
            return self.decide()
        return []

    def retire(self, slot: Seat) -> list[Action]:
        """The pool retires a worker (idle too long, served its quota); its room frees."""
        self._unidle(slot)
        self.live -= 1
        return self.decide()

    def gone(self, slot: Seat, retired: bool) -> list[Action]:
        """A worker exited (retired, crashed or killed)."""
        self._unidle(slot)
        if not retired:
            self.live -= 1
        for state in self.models.values():
            if state.loader is slot:
                state.loader, state.phase = None, Phase.COLD
        return self.decide()

    def start_failed(self, key: str) -> tuple[Any, list[Action]]:
        """A worker or template that was asked for will not come: the prompt it
        was started for, taken out of the queue for the pool to fail, and what
        to do next."""
        self.live -= 1
        state = self.model(key)
        state.starting -= 1
        if state.phase is Phase.LOADING and state.loader in (None, "template"):
            state.loader, state.phase = None, Phase.COLD
        head = self._head(state)
        if head is not None:
            self.cancel(head)
        return head, self.decide()

    def fork_lost(self, key: str, template: Any) -> list[Action]:
        """A fork asked of a template that can fork no more (it died): nothing
        ran, so its prompt waits on, and no more forks are asked of it."""
        self.live -= 1
        state = self.model(key)
        state.starting -= 1
        if state.template is template:
            state.template = None
            state.phase = Phase.WARM if self._idle_with.get(key) else Phase.COLD
        return self.decide()

    # ------------------------------------------------------------ templates
    def template_started(self, key: str, template: Any) -> None:
        self.model(key).loader = template

    def template_ready(self, key: str, template: Any) -> list[Action]:
        """The candidate loaded the model and can be forked from; its room goes
        to the first worker forked from it."""
        state = self.model(key)
        state.template, state.loader, state.phase, state.shareable = (
            template,
            None,
            Phase.WARM,
            True,
        )
        return [ForkFrom(template, key), *self.decide()]  # ``starting`` carries over

    def template_became_worker(self, slot: Seat, key: str, reason: str) -> list[Action]:
        """The candidate cannot be forked from: it serves as a worker (with the
        model loaded, unless its warm-up failed)."""
        state = self.model(key)
        state.shareable, state.reason, state.loader = False, reason, None
        state.phase = Phase.WARM if key in slot.models else Phase.COLD
        return self.arrived(slot, key)

    def template_gone(self, key: str, template: Any, reason: str) -> list[Action]:
        """A template (or a candidate, mid-load) ended."""
        state = self.model(key)
        if state.template is template:  # workers load the model for themselves now
            state.template = None
            state.phase = Phase.WARM if self._idle_with.get(key) else Phase.COLD
        elif state.loader is template:  # died while loading: it held a room
            state.loader, state.phase = None, Phase.COLD
            state.shareable, state.reason = False, reason
            self.live -= 1
            state.starting -= 1
        return self.decide()

    def sharing(self, pid: Callable[[Any], int]) -> dict[str, str]:
        """Per model: shared from a template (``pid`` tells its process), or why not."""
        report = {}
        for key, state in self.models.items():
            model_id = key.split("\0", 1)[0]
            if state.template is not None:
                report[model_id] = f"shared from template pid {pid(state.template)}"
            elif state.shareable is False:
                report[model_id] = f"not shared: {state.reason}"
        return report

    # ------------------------------------------------------------ deciding
    def decide(self) -> list[Action]:
        actions: list[Action] = []
        heads = []
        for state in self.models.values():
            head = self._head(state)
            if head is not None:
                heads.append((head.seq, state))
        for _seq, state in sorted(heads, key=lambda pair: pair[0]):
            self._place(state, actions)
        return actions

    def _place(self, state: Model, actions: list[Action]) -> None:
        key = state.key
        while (head := self._head(state)) is not None:
            slot = self._idle_slot(key, head.affinity)
            if slot is not None:
                self._begin(state, head, slot, actions)
                continue
            if state.phase is Phase.LOADING:
                return
            uncovered = state.count > state.starting
            if state.template is not None:
                if not uncovered:
                    return
                if not self.room(self.live):
                    victim = next(iter(self._idle), None)
                    if victim is None:
                        return
                    self._unidle(victim)
                    self.live -= 1
                    actions.append(Retire(victim))
                self.live += 1
                state.starting += 1
                actions.append(ForkFrom(state.template, key))
                continue
            fresh = next((s for s in reversed(self._idle) if not s.models), None)
            if fresh is not None:
                self._begin(state, head, fresh, actions)
                continue
            if uncovered and self.room(self.live):
                self.live += 1
                state.starting += 1
                if state.can_share and state.shareable is not False and state.phase is Phase.COLD:
                    state.phase, state.loader = Phase.LOADING, "template"
                    actions.append(StartTemplate(key, head))
                else:
                    actions.append(StartWorker(key))
                continue
            if uncovered and self._idle:
                self._begin(state, head, next(reversed(self._idle)), actions)
                continue
            return

    def _begin(self, state: Model, task: Any, slot: Any, actions: list[Action]) -> None:
        self._unidle(slot)
        state.waiting.popleft()
        state.count -= 1
        task.queued = False
        cold = state.key not in slot.models
        if cold and state.phase is Phase.COLD:
            state.phase, state.loader = Phase.LOADING, slot
        actions.append(Begin(task, slot, cold))

    def _head(self, state: Model) -> Any:
        """The model's oldest prompt still waiting (cancelled ones are dropped here)."""
        waiting = state.waiting
        while waiting and not (waiting[0].queued and not waiting[0].closed):
            task = waiting.popleft()
            if task.queued:  # its consumer left without a cancel reaching us
                task.queued = False
                state.count -= 1
        return waiting[0] if waiting else None

    def _idle_slot(self, key: str, affinity: Hashable | None) -> Any:
        return pick_idle(list(self._idle_with.get(key) or ()), lambda s: s.served, affinity)

    def _unidle(self, slot: Any) -> None:
        if slot in self._idle:
            del self._idle[slot]
            for key in slot.models:
                self._idle_with.get(key, {}).pop(slot, None)


def pick_idle(
    idle: Sequence[Any], served: Callable[[Any], Hashable | None], affinity: Hashable | None
) -> Any:
    """Of the idle workers (or thread-mode instances) with a model, oldest first:
    the conversation's own; else the most recent one that holds no conversation;
    else the one whose conversation went quiet longest (the others may be
    continued soon). The thread pool uses it too."""
    if affinity is not None:
        for worker in idle:
            if served(worker) == affinity:
                return worker
    for worker in reversed(idle):
        if served(worker) is None:
            return worker
    return idle[0] if idle else None
