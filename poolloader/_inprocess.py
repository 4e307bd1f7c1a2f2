"""Loading in the calling process (``num_workers=0``), as torch does, plus the
per-batch seeding and resume ledger the pool iterator has."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterDataPipe, MapDataPipe
from torch.utils.data._utils.pin_memory import pin_memory
from torch.utils.data.dataloader import (
    _BaseDataLoaderIter,
    _DatasetKind,
    _SingleProcessDataLoaderIter,
)

from . import _seeding
from ._deaths import short
from ._loader_resume import replaced_error
from ._packing import check_size
from ._skeleton import nbytes
from .errors import ResultTooLargeError, _map_style_stop_iteration

if TYPE_CHECKING:
    from .loader import DataLoader

_profiler_enabled = torch._C._autograd._profiler_enabled


class InProcessIterator(_SingleProcessDataLoaderIter):
    """torch's in-process iterator, with poolloader's seeding and resume.

    It reads the dataset itself, not ``loader.dataset``'s view. Under
    ``seeding="batch"`` each batch is loaded with ``random``, NumPy and torch
    seeded as a worker would seed them, so a batch is the same whatever
    ``num_workers`` is; the caller's random state is put back afterwards, so
    data loading does not disturb the training loop's random numbers.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        beginning = loader._before_iter()
        # torch's _SingleProcessDataLoaderIter.__init__ but for its fetcher, which it
        # would build over loader.dataset (the view): an IterableDataset's
        # __iter__ would run twice an epoch, once with the view as ``self``.
        beginning.init_iterator(
            loader, functools.partial(_BaseDataLoaderIter.__init__, self, loader)
        )
        if self._timeout != 0:
            raise AssertionError("_SingleProcessDataLoaderIter requires timeout == 0")
        self._dataset = loader._dataset_target
        if isinstance(self._dataset, (IterDataPipe, MapDataPipe)):
            torch.utils.data.graph_settings.apply_sharding(
                self._dataset, self._world_size, self._rank
            )
        self._ledger = beginning.ledger(self)
        if beginning.in_epoch is not None:
            self._base_seed = beginning.in_epoch["base_seed"]
        elif beginning.base_seed is not None:
            self._base_seed = beginning.base_seed
        self._position = loader._next_epoch(self)
        self._epoch = self._position.epoch
        self._seed_batches = loader.seeding == "batch"
        self._iterable = self._dataset_kind == _DatasetKind.Iterable
        self._max_batch_bytes = loader.max_batch_bytes
        self._loader_stats = loader._stats
        self._settling = loader._channel.settling
        self._handed: tuple[Any, int] | None = None  # delivered, not returned yet
        self._dataset_fetcher = _DatasetKind.create_fetcher(
            self._dataset_kind,
            self._dataset,
            self._auto_collation,
            self._collate_fn,
            self._drop_last,
        )

    @property
    def finished(self) -> bool:
        return self._position.finished

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return self._ledger.state(int(self._base_seed))

    def __next__(self) -> Any:
        try:
            # torch wraps each step in a profiler range (about 8 µs even when nothing
            # records it); it is kept whenever a profiler is on, and for an
            # IterableDataset (torch's length warning comes with it).
            if self._iterable or _profiler_enabled():
                data = super().__next__()
            else:
                if self._sampler_iter is None:
                    self._reset()  # type: ignore[call-arg]
                data = self._next_data()
                self._num_yielded += 1
        except Exception:
            # A batch's own error (or the epoch's end) is the caller's from here on.
            self._ledger.in_hand = None
            raise
        # No call from here to the caller (NOTE [ Handing a batch over ] in _iterator.py,
        # NOTE [ The batch in hand ] in _resume.py).
        self._handed = self._ledger.in_hand = None
        return data

    def _next_data(self) -> Any:
        handed = self._handed
        if handed is not None:  # an interrupt took it on its way to the caller
            self._ledger.consumed(handed[1])
            return handed[0]
        if self._position.replaced:
            raise replaced_error(self._epoch, self._position.ledger.yielded)
        started = time.perf_counter()  # loading in place is the consumer's wait
        if self._settling:  # what C code wrote into loader.dataset's lists reaches the
            self._settling.settle()  # dataset before the batch (as a worker's stamp)
        data = self._load_next()
        self._loader_stats.record_wait(time.perf_counter() - started)
        self._loader_stats.batches += 1
        return data

    def _load_next(self) -> Any:
        while True:
            try:
                position, index = self._ledger.draw(self._sampler_iter)
            except StopIteration:
                self._position.finished = True
                self._ledger.warn_if_cut_short()
                raise
            try:
                data = self._fetch(position, index)
            except StopIteration as exc:
                self._ledger.consumed(position)
                if self._dataset_kind != _DatasetKind.Iterable:
                    raise _map_style_stop_iteration() from exc  # as the workers say it
                self._position.finished = True
                raise
            except Exception:  # its outcome, the caller's once __next__ raises it
                if not self._ledger.will_drop(position):
                    self._ledger.in_hand = position
                self._ledger.consumed(position)
                if self._ledger.dropped(position):
                    continue  # raised to the consumer before the state was saved
                raise
            if not self._ledger.dropped(position):
                break
            self._ledger.consumed(position)
        try:
            if self._max_batch_bytes is not None:  # as the workers' transports refuse it
                try:
                    check_size(nbytes(data), self._max_batch_bytes)
                except ResultTooLargeError as exc:
                    exc.args = (f"{exc.args[0]}\n(batch {position} with indices {short(index)})",)
                    raise
            if self._pin_memory:
                data = pin_memory(data, self._pin_memory_device)
        except Exception:
            self._ledger.in_hand = position  # its error is its outcome (as above)
            self._ledger.consumed(position)
            raise
        self._handed, self._ledger.in_hand = (data, position), position  # then counted
        self._ledger.consumed(position)
        return data

    def _fetch(self, position: int, index: Any) -> Any:
        if not self._seed_batches:
            return self._dataset_fetcher.fetch(index)
        with _seeding.own_random_state():
            _seeding.seed_batch(int(self._base_seed), self._epoch, position)
            try:
                return self._dataset_fetcher.fetch(index)
            finally:
                _seeding.end_batch()
