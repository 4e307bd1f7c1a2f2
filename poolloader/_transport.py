"""Moving batches from workers to the main process.

A transport has two halves: a :class:`Packer` built inside each worker from a
picklable config, which turns a batch into a small payload, and the main
process's :class:`Transport`, which turns the payload back into the batch.

:class:`PickleTransport` pickles the batch with multiprocessing's
``ForkingPickler``, for which torch registers reducers that move tensor storage
through shared memory (the stock loader's path).
"""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

import numpy as np
import torch


class Packer(Protocol):
    """Worker half: batch → ``(payload, bytes moved)``."""

    def pack(self, batch: Any) -> tuple[Any, int]: ...


class Transport(Protocol):
    """Main-process half."""

    def packer_factory(self) -> Any:
        """A picklable callable that builds the worker's :class:`Packer`."""
        ...

    def unpack(self, payload: Any) -> Any: ...

    def discard(self, payload: Any) -> None:
        """Release a payload whose batch nobody will read (a cancelled task)."""
        ...

    def close(self) -> None: ...


def nbytes(batch: Any) -> int:
    """Bytes of tensor and array data in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.numel()
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, Mapping):
        return sum(nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(nbytes(v) for v in batch)
    return 0


class _PicklePacker:
    def pack(self, batch: Any) -> tuple[Any, int]:
        payload = bytes(ForkingPickler.dumps(batch))
        return payload, max(nbytes(batch), len(payload))


def _make_pickle_packer() -> _PicklePacker:
    return _PicklePacker()


class PickleTransport:
    """Batches travel pickled, tensors through fresh shared memory (torch's default)."""

    def packer_factory(self) -> Any:
        return _make_pickle_packer

    def unpack(self, payload: Any) -> Any:
        return ForkingPickler.loads(payload)

    def discard(self, payload: Any) -> None:
        # Unpickling releases the shared memory that torch's reducers handed over.
        try:
            ForkingPickler.loads(payload)
        except Exception:
            pass

    def close(self) -> None:
        pass
