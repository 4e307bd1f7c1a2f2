"""``persistent_workers=False``: each epoch's workers start afresh and see the
dataset as it is then (:func:`start_afresh_each_epoch`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch.utils.data.dataloader import _DatasetKind

from . import _pickling
from ._messages import Refresh, Replace

if TYPE_CHECKING:
    from ._pool import Pool
    from .loader import DataLoader


def start_afresh_each_epoch(loader: DataLoader[Any], pool: Pool) -> None:
    """``persistent_workers=False``: this epoch's workers are fresh processes that
    see the dataset as it is now, as torch's new workers would.

    Workers forked from a template (NOTE [ Templates ]) start afresh from its
    copy: unchanged, nothing is sent (:class:`Refresh`); changed, the template
    unpickles the new snapshot once (:class:`Replace`). A dataset that cannot
    be pickled here (``fork``, or multiprocessing objects inside) gets a new
    template. Workers started directly load the snapshot themselves.

    While another iterator of this loader still loads batches (a framework
    that made one and left it, a peek), the epoch keeps the workers when the
    dataset is unchanged: fresh ones would also serve that iterator's
    remaining batches, with fresh random state (torch gives each iterator
    workers of its own; here they share a pool, and each worker keeps each
    epoch's state). A changed map-style dataset still gets fresh workers,
    which the other iterator's later batches see too. An IterableDataset's
    workers are kept in any case: fresh ones would restart that iterator's
    streams."""
    dataset = loader._dataset_target
    others_load = any(it.loading for it in list(loader._iterators))
    streams = loader._dataset_kind == _DatasetKind.Iterable
    if not pool.forks_workers and not others_load:
        with loader._channel.pinning():
            pickled = _pickling.dumps(dataset, "dataset")
        loader._channel.record(Replace(pickled))
        return
    fingerprint = None if pool.inherits_dataset else loader._fingerprint_now()
    unchanged = (
        fingerprint is not None
        and fingerprint[0] is not None
        and fingerprint == loader._fingerprint
    )
    if others_load and (unchanged or streams):
        if not unchanged:
            _warn_stale_template(loader)
        return
    if not pool.forks_workers:  # (another iterator loads: the workers take it live)
        with loader._channel.pinning():
            pickled = _pickling.dumps(dataset, "dataset")
        loader._channel.record(Replace(pickled))
        return
    if unchanged:
        loader._channel.record(Refresh())  # unchanged since the template's copy
        return
    with loader._channel.pinning():  # held with the Replace below, or the next change
        # (fork: a new template, unless another iterator's batches need this one)
        picklable = fingerprint is not None or others_load
        snapshot = _pickling.dumps_or_none(dataset) if picklable else None
    if snapshot is None:
        if not pool.restart_template(dataset):
            # Another iterator still wants batches: fresh workers come from the
            # template as it is (changes made through loader.dataset reach
            # them; changes made to the dataset object directly do not).
            loader._channel.record(Refresh())
            _warn_stale_template(loader)
        return
    if snapshot == loader._snapshot:
        loader._channel.record(Refresh())
    else:
        loader._channel.record(Replace(snapshot))
        loader._snapshot = snapshot
    # The template's copy is now the dataset as fingerprinted above (neither
    # Refresh nor Replace counts as a change recorded through loader.dataset).
    if fingerprint is not None:
        loader._fingerprint = fingerprint


def _warn_stale_template(loader: DataLoader[Any]) -> None:
    if loader._warned_stale_template:
        return
    loader._warned_stale_template = True
    warnings.warn(
        "An epoch of this DataLoader began while another of its iterators still "
        "had batches to load, so its workers hold the dataset as it was when that "
        "iterator's epoch began: a change made since to the dataset object directly "
        "(not through loader.dataset) does not reach them. Make changes through "
        "loader.dataset, or finish (or delete) the other iterator first.",
        RuntimeWarning,
        stacklevel=4,
    )
