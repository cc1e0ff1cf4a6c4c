"""One engine, one request at a time: a worker thread takes jobs in order from a bounded queue and streams
each job's pieces back to its request's event loop. A job stops early when its client goes away (cancel) or
its deadline passes; either way the engine's cache stays consistent for the next request."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.prompt import Turn
from runtime.settings import GenerationSettings


class EventKind(str, Enum):
    PIECE = "piece"    # a piece of answer text
    DONE = "done"      # the GenerationResult
    ERROR = "error"    # (HTTP status, message)


class QueueFull(Exception):
    pass


@dataclass
class Job:
    turns: list[Turn]
    image: bytes | None
    settings: GenerationSettings
    deadline: float  # time.monotonic() after which the job stops
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: EventKind, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            self.cancelled.set()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    @property
    def timed_out(self) -> bool:
        return not self.cancelled.is_set() and time.monotonic() > self.deadline


@dataclass
class Stats:
    served: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    rejected: int = 0  # queue full


class Worker:
    def __init__(self, pipeline: Pipeline, max_queue: int, timeout_s: float):
        self.pipeline, self.timeout_s = pipeline, timeout_s
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = Stats()
        self.busy = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Server shutdown: the running job stops at its next piece, queued ones are told the server is going."""
        self._closing.set()
        self.jobs.put(None)  # after the jobs already queued
        self._thread.join()

    def submit(self, turns: list[Turn], image: bytes | None, settings: GenerationSettings) -> Job:
        job = Job(turns, image, settings, time.monotonic() + self.timeout_s, asyncio.get_running_loop())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            raise QueueFull(f"server busy: {self.jobs.maxsize} requests are waiting; retry later") from None
        return job

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                self._serve(job)
            finally:
                self.busy = False

    def _serve(self, job: Job) -> None:
        if self._closing.is_set():
            job.emit(EventKind.ERROR, (503, "the server is shutting down"))
            return
        if job.should_stop():  # the client left or the deadline passed while it waited
            self._stopped(job)
            return
        pieces = self.pipeline.chat_stream(job.turns, job.image, job.settings)
        stopped = False
        try:
            for piece in pieces:
                if job.should_stop() or self._closing.is_set():
                    stopped = True
                    break
                job.emit(EventKind.PIECE, piece)
        except UserError as e:
            self.stats.failed += 1
            job.emit(EventKind.ERROR, (400, str(e)))
            return
        except Exception as e:  # an engine failure must not take the server down; the next request may work
            self.stats.failed += 1
            job.emit(EventKind.ERROR, (500, f"generation failed: {type(e).__name__}: {e}"))
            return
        finally:
            pieces.close()  # stops generation when we broke out early
        if stopped:
            self._stopped(job)
            return
        self.stats.served += 1
        job.emit(EventKind.DONE, self.pipeline.last_result)

    def _stopped(self, job: Job) -> None:
        if job.timed_out:
            self.stats.timed_out += 1
            job.emit(EventKind.ERROR, (504, f"the request took longer than the server's limit of {self.timeout_s:g} s"))
        elif job.cancelled.is_set():
            self.stats.cancelled += 1
        else:
            job.emit(EventKind.ERROR, (503, "the server is shutting down"))

