"""Starting a loader's pool: what its workers are set up with, the transport
their batches travel by, and the dataset's way to them: inherited with
``fork``, else pickled while the template process starts (NOTE [ Templates ] in
``_template.py``), the pickle becoming the control channel's base.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.multiprocessing
from torch.utils.data.dataloader import _DatasetKind

from . import _pickling, _proctree, _segment
from ._forkserver import start_forkserver
from ._messages import DatasetFollows, PickledObject
from ._options import REORDER_MAX_PER_WORKER, resolve_context
from ._pool import Pool
from ._slab_transport import SlabTransport
from ._transport import PickleTransport
from ._worker import WorkerSetup

if TYPE_CHECKING:
    from .loader import DataLoader


def start_pool(loader: DataLoader[Any], base_seed: int) -> Pool:
    """A started pool for ``loader``'s options and dataset, its workers seeded
    from ``base_seed``."""
    context = resolve_context(loader.multiprocessing_context)
    if context.get_start_method() == "forkserver":
        # The server answers a start only once it runs (a new interpreter importing
        # torch): started first, it does that while the dataset is pickled, and
        # with the main module to preload (NOTE [ The fork server's __main__ ]).
        start_forkserver()
    inherited = context.get_start_method() == "fork"
    functions = (loader.collate_fn, _worker_init(loader))
    loader._snapshot = None
    loader._channel.start(None)
    transport = _make_transport(loader)
    setup = WorkerSetup(
        worker_id=-1,
        num_workers=loader.num_workers,
        dataset=loader._dataset_target if inherited else DatasetFollows(),
        functions=_pickling.ship(functions, "collate_fn", inherited=inherited),
        dataset_kind=loader._dataset_kind,
        auto_collation=loader._auto_collation,
        drop_last=loader.drop_last,
        seeding=loader.seeding,
        base_seed=base_seed,
        packer_factory=transport.packer_factory(),
        collate_privately=isinstance(transport, SlabTransport),
        main_pid=os.getpid(),
        main_started=_proctree.created(os.getpid()),
        sharing_strategy=torch.multiprocessing.get_sharing_strategy(),
    )
    pool = Pool(
        context=context,
        num_workers=loader.num_workers,
        setup=setup,
        channel=loader._channel,
        transport=transport,
        max_restarts=loader.max_worker_restarts,
        resumable=loader._dataset_kind == _DatasetKind.Map,
        dataset=loader._dataset_target,
    )
    pool.belongs_to(loader)
    try:
        if inherited:
            pool.start()
        else:
            # Pickled while the template starts; fingerprinted while it unpickles.
            pool.start(
                functools.partial(_ship_dataset, loader),
                meanwhile=functools.partial(_take_fingerprint, loader),
            )
    except BaseException:  # (a Ctrl-C as start() began, before it could close the pool)
        pool.close()
        raise
    return pool


def _take_fingerprint(loader: DataLoader[Any]) -> None:
    loader._fingerprint = loader._fingerprint_now()


def _ship_dataset(loader: DataLoader[Any], on_part: _pickling.OnPart | None) -> Any:
    """The dataset as it travels to a new pool (``_pickling.ship``, ``on_part``
    taking its pickle as it is made); the pickle becomes the control channel's
    base and the snapshot epochs compare with."""
    with _segment.pinning() as pinned:  # NOTE [ Pinned segments ] in _control.py
        dataset = _pickling.ship(loader._dataset_target, "dataset", inherited=False,
                                 on_part=on_part)  # fmt: skip
    if isinstance(dataset, PickledObject):
        loader._snapshot = dataset.data
        loader._channel.provide_base(dataset.data, pinned)
    return dataset


def _worker_init(loader: DataLoader[Any]) -> Callable[[int], None] | None:
    """``worker_init_fn``, wrapped as torch wraps it for a DataPipe dataset: each
    worker (of each rank) first takes its shard of the pipe."""
    from torch.utils.data import IterDataPipe, MapDataPipe
    from torch.utils.data.dataloader import (
        _get_distributed_settings,
        _sharding_worker_init_fn,
    )

    if not isinstance(loader._dataset_target, (IterDataPipe, MapDataPipe)):
        return loader.worker_init_fn
    world_size, rank = _get_distributed_settings()
    return functools.partial(_sharding_worker_init_fn, loader.worker_init_fn, world_size, rank)


def _make_transport(loader: DataLoader[Any]) -> PickleTransport | SlabTransport:
    if loader.transport == "pickle":
        return PickleTransport(loader.max_batch_bytes)
    # Batches alive at once: the whole window at its widest, one being consumed
    # and one the consumer let go of as it asked for the next. Slabs are made only
    # when none is free, so the memory in use follows the window, which the
    # reorder allowance bounds; beyond this (a consumer that keeps batches) the
    # batches go through fresh memory.
    most = loader.reorder_buffer
    if most is None:
        most = REORDER_MAX_PER_WORKER * loader.num_workers
    window = (loader.prefetch_factor or 2) * loader.num_workers + most
    return SlabTransport(window + 2, loader.max_batch_bytes)
