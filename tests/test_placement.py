"""The placement policy on its own: no processes, just decisions."""

import time

import pytest

from llm_async_procpool.pools.placement import (
    Begin,
    ForkFrom,
    Phase,
    Placement,
    StartTemplate,
)


class Task:
    seq = 0

    def __init__(self, key="m", affinity=None):
        Task.seq += 1
        self.seq, self.key, self.affinity = Task.seq, key, affinity
        self.queued = False
        self.closed = False


class Slot:
    def __init__(self, *models, served=None):
        self.models = set(models)
        self.served = served


def kinds(actions):
    return [type(action).__name__ for action in actions]


def placement(capacity=2):
    return Placement(lambda live: live < capacity)


def test_a_first_prompt_starts_a_worker_and_waits_for_it():
    p = placement()
    task = Task()
    assert kinds(p.submit(task, can_share=False)) == ["StartWorker"]
    assert p.live == 1 and task.queued
    slot = Slot()
    (begin,) = p.arrived(slot, "m")
    assert begin == Begin(task, slot, cold=True)
    assert p.models["m"].phase is Phase.LOADING  # its first load


def test_while_a_first_load_runs_other_prompts_for_it_wait():
    p = placement()
    p.submit(first := Task(), False)
    p.arrived(loader := Slot(), "m")
    second = Task()
    assert p.submit(second, False) == []  # no second load at the same time
    assert p.free(Slot()) == []  # not even on an idle worker
    actions = p.loaded(loader, "m")
    assert kinds(actions) == ["Begin"] and actions[0].task is second
    assert p.models["m"].phase is Phase.WARM and first.queued is False


def test_an_idle_worker_with_the_model_is_preferred_and_the_conversation_s_own_first():
    p = placement(capacity=4)
    a, b = Slot("m", served="chat-1"), Slot("m", served="chat-2")
    p.models["m"] = p.model("m")
    p.models["m"].phase = Phase.WARM
    p.live = 2
    p.free(a)
    p.free(b)
    (begin,) = p.submit(Task(affinity="chat-1"), False)
    assert begin.slot is a and not begin.cold
    (begin,) = p.submit(Task(), False)
    assert begin.slot is b


def test_a_new_conversation_leaves_workers_that_hold_others_alone():
    """A prompt with no conversation to continue takes a worker that holds
    none, else the one whose conversation went quiet longest."""
    p = placement(capacity=4)
    p.models["m"] = p.model("m")
    p.models["m"].phase = Phase.WARM
    p.live = 3
    old, recent, spare = Slot("m", served="a"), Slot("m", served="b"), Slot("m")
    for slot in (old, recent, spare):
        p.free(slot)
    (begin,) = p.submit(Task(), False)
    assert begin.slot is spare
    (begin,) = p.submit(Task(), False)
    assert begin.slot is old  # "a" went quiet before "b"
    (begin,) = p.submit(Task(affinity="b"), False)
    assert begin.slot is recent


def test_a_template_forks_workers_while_there_is_room_then_takes_an_idle_workers_room():
    p = placement(capacity=2)
    first = Task()
    (start,) = p.submit(first, can_share=True)
    assert isinstance(start, StartTemplate) and start.task is first
    template = object()
    p.template_started("m", template)
    assert p.submit(Task(), True) == []  # it is loading
    actions = p.template_ready("m", template)
    assert kinds(actions) == ["ForkFrom", "ForkFrom"]  # the candidate's room, then one more
    assert p.live == 2
    other = Slot("other")
    p.free(other)
    third = Task()
    actions = p.submit(third, True)
    assert kinds(actions) == ["Retire", "ForkFrom"] and actions[0].slot is other


def test_a_fork_lost_to_a_dead_template_is_not_asked_again():
    """Regression: each lost fork used to ask the dead template again, forever."""
    p = placement()
    p.submit(Task(), True)
    template = object()
    p.template_started("m", template)
    p.template_ready("m", template)
    actions = p.fork_lost("m", template)
    assert not any(isinstance(a, ForkFrom) for a in actions)
    assert kinds(actions) == ["StartTemplate"]  # the model loads again, in a new candidate


def test_a_candidate_that_cannot_be_shared_serves_as_a_worker():
    p = placement()
    task, waiting = Task(), Task()
    p.submit(task, True)
    p.template_started("m", object())
    p.submit(waiting, True)
    slot = Slot("m")
    actions = p.template_became_worker(slot, "m", "it opened a socket")
    assert kinds(actions) == ["Begin", "StartWorker"]
    assert actions[0].slot is slot and not actions[0].cold
    state = p.models["m"]
    assert (state.shareable, state.reason, state.phase) == (False, "it opened a socket", Phase.WARM)


def test_a_failed_warm_up_leaves_the_model_cold_so_the_next_load_is_a_first_load():
    p = placement()
    p.submit(task := Task(), True)
    p.template_started("m", object())
    p.submit(Task(), True)
    slot = Slot()  # the warm-up failed: nothing is loaded in it
    actions = p.template_became_worker(slot, "m", "its warm-up prompt failed")
    assert kinds(actions) == ["Begin"] and actions[0].task is task and actions[0].cold
    assert p.models["m"].phase is Phase.LOADING  # the other prompt waits for this load


def test_at_capacity_any_idle_worker_takes_a_prompt_for_another_model():
    p = placement(capacity=1)
    p.submit(Task("a"), False)
    slot = Slot()
    p.arrived(slot, "a")
    p.loaded(slot, "a")
    b = Task("b")
    assert p.submit(b, False) == []  # the only worker is busy
    (begin,) = p.free(slot)
    assert begin.task is b and begin.cold


def test_a_failed_start_hands_back_its_prompt_and_the_next_one_tries_again():
    p = placement()
    first, second = Task(), Task()
    p.submit(first, False)
    p.submit(second, False)
    failed, actions = p.start_failed("m")
    assert failed is first and not first.queued
    assert kinds(actions) == []  # the other start is still on its way
    failed, actions = p.start_failed("m")
    assert failed is second and actions == [] and p.live == 0


def test_cancelled_and_abandoned_prompts_are_skipped():
    p = placement(capacity=1)
    first, second, third = Task(), Task(), Task()
    for task in (first, second, third):
        p.submit(task, False)
    assert p.cancel(second) and not p.cancel(second)
    third.closed = True  # its consumer left without a cancel reaching us
    slot = Slot()
    (begin,) = p.arrived(slot, "m")
    assert begin.task is first
    p.loaded(slot, "m")
    assert p.free(slot) == []  # nothing left to run
    assert p.waiting() == []


def test_retiring_and_losing_workers_frees_their_room():
    p = placement(capacity=1)
    p.submit(Task(), False)
    slot = Slot()
    p.arrived(slot, "m")
    assert p.gone(slot, retired=False) == [] and p.live == 0
    p.submit(Task(), False)
    assert p.live == 1


def test_models_take_turns_by_their_oldest_prompt():
    p = placement(capacity=1)
    p.submit(a := Task("a"), False)
    slot = Slot()
    p.arrived(slot, "a")
    p.loaded(slot, "a")
    p.submit(b := Task("b"), False)
    p.submit(Task("a"), False)
    (begin,) = p.free(slot)
    assert begin.task is b  # b waited longest, although the worker has a loaded
    assert a is not b


@pytest.mark.parametrize("queued", [500, 5000])
def test_a_decision_does_not_walk_the_queue(queued):
    """5,000 waiting prompts cost about what 500 do, per submit and per finish."""
    p = placement(capacity=2)
    slots = [Slot("m"), Slot("m")]
    p.models["m"] = p.model("m")
    p.models["m"].phase = Phase.WARM
    p.live = 2
    for _ in range(queued):
        p.submit(Task(), False)
    started = time.perf_counter()
    for _ in range(200):
        p.submit(Task(), False)
        for slot in slots:
            p.free(slot)
    per_step = (time.perf_counter() - started) / 600
    assert per_step < 200e-6  # generous: about 5 us here, whatever the queue
