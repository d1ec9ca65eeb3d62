"""The background loop both outboxes share: claim one due item, deliver it in a thread, then
sleep until the next one is due or `wake()` says a new one was added.

Claims are leases (`claim_seconds`), so an item claimed by a process that died is taken
again by any instance once the lease runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger("calmline.callback.worker")
Item = TypeVar("Item")


class DeliveryWorker(Generic[Item]):
    """Delivers one outbox's due items; subclasses say how one item is delivered."""

    kind = "delivery"  # names the trail's `<kind>_worker_error` event

    def __init__(self, outbox: Any, cfg: Any, *, claim_seconds: float,
                 clock: Callable[[], float] = time.time, max_sleep: float = 30.0):
        self.outbox = outbox
        self.cfg = cfg
        self.claim_seconds = claim_seconds
        self._clock = clock
        self._max_sleep = max_sleep
        self._wake = asyncio.Event()
        self._stopping = False
        self._done: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- one item (runs in a worker thread, or directly for the CLI) ---

    def _next(self, now: float) -> Item | None:
        items = self.outbox.due(now, limit=1, claim_for=self.claim_seconds)
        return items[0] if items else None

    def _deliver(self, item: Item) -> bool:
        """Deliver one claimed item and record the outcome; True if it went out."""
        raise NotImplementedError

    def deliver_due_now(self) -> tuple[int, int]:
        """Deliver everything due now, each at most once (a failure is rescheduled after
        now); (sent, failed)."""
        when = self._clock()
        sent = failed = 0
        while (item := self._next(when)) is not None:
            if self._deliver(item):
                sent += 1
            else:
                failed += 1
        return sent, failed

    # --- the loop ---

    def wake(self) -> None:
        """Look at the outbox now (after an add); safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._wake.set)
                return
        self._wake.set()

    def _sleep_for(self) -> float:
        next_due = self.outbox.next_due()
        if next_due is None:
            return self._max_sleep
        return min(max(next_due - self._clock(), 0.01), self._max_sleep)

    def _started(self) -> None:
        """Hook: the loop begins."""

    def _stopped(self) -> None:
        """Hook: the loop has ended."""

    async def run(self) -> None:
        """Deliver due items until `stop()`; never raises for delivery or database trouble."""
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._started()
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    while not self._stopping:
                        item = await asyncio.to_thread(self._next, self._clock())
                        if item is None:
                            break
                        await asyncio.to_thread(self._deliver, item)
                    delay = await asyncio.to_thread(self._sleep_for)
                except Exception as exc:  # noqa: BLE001 - keep the worker alive
                    log.error(f"{self.kind}_worker_error", error=f"{type(exc).__name__}: {exc}")
                    delay = min(self.cfg.retry_initial_seconds, self._max_sleep)
                if self._stopping:
                    break
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            self._done.set()
            self._stopped()

    async def stop(self) -> None:
        """Finish the item in flight, then return once `run()` has ended."""
        self._stopping = True
        self._wake.set()
        if self._done is not None:
            await self._done.wait()
