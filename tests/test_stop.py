"""Stop.until: a wait ends in Stopped when the run drains, and only then (issue 22 made the
waiting task itself what a drain cancels, instead of a task per wait)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.run.stop import Stop, Stopped


async def test_a_drain_ends_every_wait_in_stopped_and_the_task_goes_on() -> None:
    stop = Stop()
    started = asyncio.Event()

    async def waiter() -> str:
        started.set()
        try:
            await stop.until(asyncio.sleep(60))
        except Stopped:
            await asyncio.sleep(0)  # the task is not left cancelled: it can await again
            return "stopped"
        return "slept"

    task = asyncio.ensure_future(waiter())
    await started.wait()
    stop.drain("test")
    assert await asyncio.wait_for(task, 5) == "stopped"
    with pytest.raises(Stopped):
        await stop.until(asyncio.sleep(0))  # a wait after the drain is refused at once


async def test_a_wait_returns_its_value_and_an_outside_cancel_stays_a_cancel() -> None:
    stop = Stop()

    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert await stop.until(value()) == 7
    task = asyncio.ensure_future(stop.until(asyncio.sleep(60)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.running


async def test_nested_waits_end_once_in_stopped() -> None:
    stop = Stop()
    inner_started = asyncio.Event()

    async def inner() -> None:
        inner_started.set()
        await stop.until(asyncio.sleep(60))

    task = asyncio.ensure_future(stop.until(inner()))
    await inner_started.wait()
    stop.drain("test")
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 5)
