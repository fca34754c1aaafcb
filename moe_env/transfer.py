"""Copy engine: host tier -> device slots over one FIFO link, with the time the compute side waits (stall).

- CUDA: one side stream; non-blocking copies from pinned memory, one event per copy; compute waits on the GPU
  (stream.wait_event) only for the expert it needs. Stall is measured on the GPU with timing events around each
  wait that was not already satisfied.
- CPU: a copy thread consuming a FIFO queue. A copy's source is a tensor or a reader `fn(dst)` (the disk store
  preads the expert straight into the slot). With a LinkModel each copy is paced to take latency + bytes /
  bandwidth (sleeping off the remainder), so a CPU run reports the stalls of a target link.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from moe_env.errors import UsageError
from moe_env.links import LINKS as LINKS  # re-exported
from moe_env.links import LinkModel
from moe_env.links import link_by_name as link_by_name  # re-exported


class Ticket:
    """One queued copy; `done` answers without blocking."""

    __slots__ = ("error", "event", "nbytes", "start")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.event: threading.Event | torch.cuda.Event | None = None
        self.start: torch.cuda.Event | None = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self.event is None:
            return True
        return self.event.is_set() if isinstance(self.event, threading.Event) else bool(self.event.query())


Source = torch.Tensor | Callable[[torch.Tensor], None]  # a tensor to copy, or a reader that fills dst (CPU only)


class CopyEngine:
    """Interface shared by the CPU and CUDA engines."""

    def submit(self, dst: torch.Tensor, src: Source, after: torch.cuda.Event | None = None) -> Ticket:
        raise NotImplementedError

    def wait(self, ticket: Ticket | None) -> None:
        """Make the compute side wait for `ticket`'s copy (no-op when done)."""
        raise NotImplementedError

    def stall_s(self) -> float:
        raise NotImplementedError

    def copy_s(self) -> float:
        """Total time the link spent copying (paced time on CPU, measured copy time on CUDA)."""
        raise NotImplementedError

    def reset_stats(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class ThreadCopyEngine(CopyEngine):
    """CPU: one copy thread, FIFO; optional pacing to a LinkModel."""

    def __init__(self, link: LinkModel):
        self.link = link
        self._queue: queue.Queue[tuple[Ticket, torch.Tensor, Source] | None] = queue.Queue()
        self._stall = 0.0
        self._busy = 0.0
        self._thread = threading.Thread(target=self._loop, name="moe-env-copy", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ticket, dst, src = item
            start = time.perf_counter()
            try:
                if callable(src):
                    src(dst)
                else:
                    dst.copy_(src)
            except BaseException as exc:  # reported to the waiter, never lost in the thread
                ticket.error = exc
            remaining = start + self.link.copy_seconds(ticket.nbytes) - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
            self._busy += time.perf_counter() - start
            assert isinstance(ticket.event, threading.Event)
            ticket.event.set()

    def submit(self, dst: torch.Tensor, src: Source, after: torch.cuda.Event | None = None) -> Ticket:
        ticket = Ticket(dst.numel() * dst.element_size())
        ticket.event = threading.Event()
        self._queue.put((ticket, dst, src))
        return ticket

    def wait(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        assert isinstance(ticket.event, threading.Event)
        if not ticket.event.is_set():
            start = time.perf_counter()
            ticket.event.wait()
            self._stall += time.perf_counter() - start
        if ticket.error is not None:
            raise RuntimeError(f"expert copy failed: {ticket.error}") from ticket.error

    def drain(self) -> None:
        """Block until every queued copy is done (not counted as stall)."""
        marker = threading.Event()
        done = Ticket(0)
        done.event = marker
        self._queue.put((done, torch.empty(0), torch.empty(0)))
        marker.wait()

    def stall_s(self) -> float:
        return self._stall

    def copy_s(self) -> float:
        return self._busy

    def reset_stats(self) -> None:
        self.drain()
        self._stall = 0.0
        self._busy = 0.0

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class CudaCopyEngine(CopyEngine):
    """CUDA: a side stream; the compute stream waits per expert on that copy's event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._copies: list[Ticket] = []
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def submit(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None) -> Ticket:
        ticket = Ticket(src.numel() * src.element_size())
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # the slot's previous reader has finished
            ticket.start = torch.cuda.Event(enable_timing=True)
            ticket.start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            ticket.event = torch.cuda.Event(enable_timing=True)
            ticket.event.record(self.stream)
        self._copies.append(ticket)
        return ticket

    def wait(self, ticket: Ticket | None) -> None:
        if ticket is None or ticket.event is None:
            return
        assert isinstance(ticket.event, torch.cuda.Event)
        compute = torch.cuda.current_stream(self.device)
        if ticket.event.query():
            return
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ticket.event)
        after.record(compute)
        self._waits.append((before, after))

    def stall_s(self) -> float:
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._waits) / 1e3

    def copy_s(self) -> float:
        torch.cuda.synchronize(self.device)
        return sum(t.start.elapsed_time(t.event) for t in self._copies if t.start is not None) / 1e3

    def reset_stats(self) -> None:
        torch.cuda.synchronize(self.device)
        self._copies.clear()
        self._waits.clear()


def make_copy_engine(device: torch.device, link: LinkModel) -> CopyEngine:
    if device.type == "cuda":
        if link.paced:
            raise UsageError(f"--link {link.name} paces CPU copies only; on CUDA the real link is measured")
        return CudaCopyEngine(device)
    return ThreadCopyEngine(link)
