"""``pin_memory=True``: finished batches are copied into pinned memory on a
thread of the iterator's own, as torch's loader does, so the consumer takes them
pinned (``_iterator.py`` waits for the pinned batch in place of the loaded one).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from ._tasks import AnyFuture, Loaded, Outcome


def start_pinner() -> ThreadPoolExecutor:
    """The thread that copies finished batches into pinned memory, as torch's does."""
    device = torch.accelerator.current_device_index()
    return ThreadPoolExecutor(
        1, thread_name_prefix="poolloader-pin", initializer=_pin_thread_init, initargs=(device,)
    )


def _pin_thread_init(device: int) -> None:
    torch.accelerator.set_device_index(device)


def pin_when_done(
    loaded: AnyFuture, pinner: ThreadPoolExecutor, device: str | None
) -> Future[Outcome]:
    """A future of the batch in pinned memory, pinned on ``pinner`` once ``loaded`` is done."""
    pinned: Future[Outcome] = Future()

    def pin(outcome: Loaded) -> None:
        try:
            data = pin_memory(outcome.data, device)
        except BaseException as exc:  # delivered to the consumer
            pinned.set_exception(exc)
            return
        pinned.set_result(Loaded(data, outcome.worker_id, outcome.pid))

    def done(future: AnyFuture) -> None:
        if future.cancelled():
            pinned.cancel()
        elif future.exception() is not None:
            pinned.set_exception(future.exception())
        elif isinstance(outcome := future.result(), Loaded):
            try:
                pinner.submit(pin, outcome)
            except RuntimeError:  # the iterator was closed meanwhile
                pinned.cancel()
        else:
            pinned.set_result(outcome)

    loaded.add_done_callback(done)
    return pinned
