"""Worker threads in the training process: batch plans in, batches out, in plan order."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from train.data.ring import BatchRing


class _Job:
    def __init__(self, number: int):
        self.number = number
        self.work = None
        self.num_chunks = 0
        self.handed = 0  # chunks given to threads
        self.finished = 0
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.finished == self.num_chunks


class _Iteration:
    """The shared state of one pass over a plan stream: the jobs in flight, under one Condition."""

    def __init__(self, builder, plans: Iterator, ring: BatchRing | None, max_ahead: int):
        self.builder, self.plans, self.ring, self.max_ahead = builder, plans, ring, max_ahead
        self.cond = threading.Condition()
        self.jobs: dict[int, _Job] = {}
        self.current: _Job | None = None  # the newest job; its chunks are handed out in order
        # Batches are numbered on from the ring's last iteration (its slots are k % num_slots).
        self.first_number = self.next_number = ring.issued if ring is not None else 0
        self.preparing = False  # a thread is starting the next job (outside the lock)
        self.exhausted = False
        self.closed = False
        self.taken = self.first_number  # the number of the next batch the consumer takes

    # --- run by the worker threads (and by the consumer when there are none) ------------------

    def work(self) -> None:
        while (task := self.take_task(block=True)) is not None:
            self.run(*task)
            del task  # a thread waiting for work must not keep its last batch alive (ring rule 3)

    def take_task(self, block: bool) -> tuple[_Job, int] | None:
        """(job, chunk index) to fill next, starting the next job when the newest is handed out;
        None when the iteration is over (or, if not `block`, when nothing can be done now)."""
        while True:
            with self.cond:
                while True:
                    if self.closed:
                        return None
                    job = self.current
                    if job is not None and job.handed < job.num_chunks and job.error is None:
                        job.handed += 1
                        return job, job.handed - 1
                    del job  # not kept while starting the next one (ring rule 3)
                    if not (self.exhausted or self.preparing) and self._may_start(self.next_number):
                        self.preparing = True  # one thread at a time starts jobs, in order
                        break
                    if not block:
                        return None
                    self.cond.wait()
            self._start_next()

    def _may_start(self, number: int) -> bool:
        if self.ring is not None:
            return self.ring.is_free(number)
        return number - self.taken < self.max_ahead

    def _start_next(self) -> None:
        """Start the next job outside the lock (its Python, ~0.5 ms a batch, must not stall the
        threads that hand in chunks meanwhile)."""
        number = self.next_number
        job, plan = _Job(number), None
        try:
            if self.ring is not None:
                self.ring.wait_device(number)
            plan = next(self.plans, None)
            if plan is not None:
                job.work = self.builder.start(plan, number, self.ring)
                job.num_chunks = job.work.num_chunks
        except BaseException as err:  # surfaces in the consumer, at this batch
            job.error = err
        with self.cond:
            self.preparing = False
            if plan is None and job.error is None:
                self.exhausted = True
            else:
                self.jobs[number] = self.current = job
                self.next_number += 1
                if self.ring is not None:
                    self.ring.issued = self.next_number
            self.cond.notify_all()

    def run(self, job: _Job, chunk: int) -> None:
        try:
            self.builder.fill(job.work, chunk)
        except BaseException as err:
            error = err
        else:
            error = None
        with self.cond:
            job.finished += 1
            if error is not None and job.error is None:
                job.error = error
            if job.done:
                self.cond.notify_all()

    # --- the consumer ------------------------------------------------------------------------

    def wait_for(self, number: int, help_out: bool) -> _Job | None:
        """Job `number` once done (None past the last plan). `help_out`: fill chunks meanwhile."""
        while True:
            with self.cond:
                job = self.jobs.get(number)
                if job is not None and job.done:
                    del self.jobs[number]
                    return job
                if job is None and self.exhausted and number >= self.next_number:
                    return None
                if not help_out:
                    self.cond.wait()
                    continue
            task = self.take_task(block=False)
            if task is not None:
                self.run(*task)
            else:
                with self.cond:
                    job = self.jobs.get(number)
                    if not (job is not None and job.done) and not self.exhausted:
                        self.cond.wait(0.01)

    def asked_past(self, number: int) -> None:
        """The consumer asks for the batch after `number`: it lets go of the one before `number`
        (one batch of grace: a `for images, labels in loader` loop still holds the last batch
        in `images` while it asks for the next)."""
        with self.cond:
            self.taken = number + 1
            if self.ring is not None and number > 0:  # the first time: the last iteration's last
                self.ring.release(number - 1)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def release_all(self, last_taken: int) -> None:
        """After the threads are gone: let go of every batch up to the one before the consumer's
        last; that one goes when the next iteration's consumer asks past its first batch (a
        training loop's `images` still holds it while the next epoch starts)."""
        if self.ring is not None and last_taken > 0:
            self.ring.release(last_taken - 1)


class WorkerThreads:
    """`num_threads` threads (0: the consumer's own) turning plans into batches via `builder`."""

    def __init__(
        self,
        builder,
        num_threads: int,
        ring: BatchRing | None,
        max_ahead: int = 4,
        name: str = "loader",
    ):
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        self.builder, self.num_threads, self.ring = builder, num_threads, ring
        self.max_ahead, self.name = max_ahead, name

    def batches(self, plans: Iterator) -> Iterator:
        """What `builder.finish` makes of each plan, in order. A batch taken from here stays
        intact until the one after next is asked for, and for as long as anything holds it
        (train.data.ring's rules). One iteration at a time per ring."""
        iteration = _Iteration(self.builder, iter(plans), self.ring, self.max_ahead)
        threads = [
            threading.Thread(target=iteration.work, name=f"{self.name}-{i}", daemon=True)
            for i in range(self.num_threads)
        ]
        number = last_taken = iteration.first_number
        try:
            with sigint_held():  # Ctrl-C inside start() would leave a thread running, unjoined
                for thread in threads:
                    thread.start()
            while (job := iteration.wait_for(number, help_out=not threads)) is not None:
                if job.error is not None:
                    raise job.error
                result = self.builder.finish(job.work, self.ring)
                del job
                last_taken = number
                yield result
                del result
                iteration.asked_past(number)
                number += 1
        finally:
            # A Ctrl-C inside join() would leave a running thread marked as stopped (CPython's
            # bpo-45274 handling): it waits until every thread of this iteration has ended.
            with sigint_held():
                iteration.close()
                for thread in threads:
                    if thread.is_alive():
                        thread.join()
            iteration.release_all(last_taken)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT waits (blocked for this thread, and so for the threads it starts) until the end."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
