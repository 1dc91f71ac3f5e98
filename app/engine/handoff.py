"""Steps handed from the engine loop to the GPU thread: the handing over, what is in flight, and
the launch signal the loop waits on before it does its own work."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from app.engine.constraints import grammar_rows
from app.engine.model_runner import ModelRunner, PendingStep
from app.engine.scheduler import SchedulerOutput, StepOutput
from app.engine.sequence import Sequence

# How long the loop blocks for a launch before it waits asynchronously instead.
LAUNCH_WAIT_S = 0.05


class Launch:
    """Set by the GPU thread once a step is on the device's queue: an event the loop can block
    on and a future it can await."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.event = threading.Event()
        self.future: asyncio.Future[None] = loop.create_future()
        self.loop = loop

    def set(self) -> None:
        if self.event.is_set():
            return
        self.event.set()
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Gate:
    """Decides once whether a queued step runs: the GPU thread `start`s it, or the loop
    `withdraw`s it before that (a request arrived that the step should have admitted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None

    def _claim(self, state: str) -> bool:
        with self._lock:
            if self._state is None:
                self._state = state
            return self._state == state

    def start(self) -> bool:
        """The GPU thread: True if the step runs, False if it was withdrawn first."""
        return self._claim("started")

    def withdraw(self) -> bool:
        """The loop: True if the step will not run, False if it has started already."""
        return self._claim("withdrawn")

    @property
    def withdrawn(self) -> bool:
        return self._state == "withdrawn"


@dataclass
class InFlight:
    """A step handed to the GPU thread, with what the loop needs when its result comes."""

    out: SchedulerOutput
    launching: asyncio.Future[PendingStep]  # done once the GPU thread has queued the step
    launch: Launch
    masks: list[Sequence | None]
    allowed: Future[Any] | None
    marks: dict[str, float] | None
    timing: dict[str, Any] | None
    gate: Gate
    _launched: Future[PendingStep]
    _result: asyncio.Future[StepOutput] | None = None

    def result(self, executor: Executor) -> asyncio.Future[StepOutput]:
        """The step's tokens on the host: a job for the GPU thread, queued behind any step
        submitted before this is first called. So a step scheduled ahead and submitted first
        reaches the device before this one's tokens come back, and the device does not wait for
        the host in between."""
        if self._result is None:
            waiting = executor.submit(_result, self._launched)
            self._result = asyncio.wrap_future(waiting, loop=self.launch.loop)
        return self._result


def submit(
    executor: Executor,
    runner: ModelRunner,
    out: SchedulerOutput,
    marks: dict[str, float] | None,
    launch_ahead: bool,
) -> InFlight:
    """Hand a step to the GPU thread (`executor`, behind any job queued there) to launch, from
    the running asyncio loop. With `launch_ahead` (a GPU) a step submitted later may launch
    before this one's tokens are collected; without it (the CPU, which computes as it
    launches) they are collected right after the launch."""
    loop = asyncio.get_running_loop()
    if marks is not None:
        marks["schedule_ms"] = (time.perf_counter() - marks["t"]) * 1e3
        marks["submit"] = time.perf_counter()
    masks = grammar_rows(out)
    allowed: Future[Any] | None = Future() if masks else None
    launch = Launch(loop)
    timing: dict[str, Any] | None = {} if marks is not None else None
    gate = Gate()
    launched = executor.submit(_launch, runner, out, allowed, launch, timing, gate)
    launching = asyncio.wrap_future(launched, loop=loop)
    step = InFlight(out, launching, launch, masks, allowed, marks, timing, gate, launched)
    if not launch_ahead:
        step.result(executor)
    return step


def _launch(
    runner: ModelRunner,
    out: SchedulerOutput,
    allowed: Future[Any] | None,
    launch: Launch,
    timing: dict[str, Any] | None,
    gate: Gate,
) -> PendingStep:  # the GPU thread
    try:
        if not gate.start():
            return PendingStep(StepOutput())  # withdrawn: the loop never reads this
        return runner.launch(out, allowed, launch.set, timing)
    finally:
        launch.set()  # a step that failed before launching must not hold the loop


def _result(launched: Future[PendingStep]) -> StepOutput:  # the GPU thread
    return launched.result().result()  # done: the launch was queued first


async def wait_launched(step: InFlight, block: bool) -> None:
    """Return once `step` is on the device's queue.

    The GPU thread's Python (inputs, kernel launches) must not queue for the GIL behind the
    loop's work (detokenization, HTTP): the device would sit idle meanwhile. So with `block`
    the loop holds still until the launch (a graph replay well under a millisecond, an eager
    step a few), waiting longer only asynchronously (a kernel compiling, or a step queued behind
    another). Without it (the CPU, where launching is computing) it only waits asynchronously."""
    if not step.launch.event.wait(LAUNCH_WAIT_S if block else 0.0):
        first = asyncio.FIRST_COMPLETED
        await asyncio.wait((step.launch.future, step.launching), return_when=first)
