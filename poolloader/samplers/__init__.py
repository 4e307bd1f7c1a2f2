"""Batch samplers for speech and audio: length-aware batches, exact resume, even sharding.

Every sampler here yields batches (lists of int indices into the ``lengths`` it was built
on; :class:`StreamSampler` yields :class:`StreamStep` specs) and follows one protocol,
written out in ``poolloader/samplers/_base.py`` (NOTE [ Sampler protocol ]): ``set_epoch``,
shuffling seeded by ``seed + epoch``, a cheap ``state_dict()`` that resumes mid-epoch
exactly, ``rank``/``world_size`` resolved from argument -> environment ->
``torch.distributed`` -> 0/1, an exact ``len()``, and limits that can change between
batches.

The pieces, and the way a batch is made::

    lengths ──► groups of items ──► PassWalk ──────────► GroupEpochIterator ──► batch
               (length buckets,     draws a group,       keeps round k's batch
                sorted runs)        cuts the longest     at this rank; pads or
                                    run that the         drops the last round
                                    BatchConstraint      (_distributed formula)
                                    admits

- :class:`DynamicBatchSampler`: batches bounded by total (or padded) length, each from
  one of ``num_buckets`` equal-mass length buckets, lhotse style.
- :class:`SortedBatchSampler`: SpeeChain's view, length-sorted batches of ``batch_size``
  items or bounded by ``max_duration``, batch order shuffled, ``batches_per_epoch``.
- :class:`BatchConstraint`: the limit object the samplers cut batches with.
- :class:`StreamSampler`: temporally coherent steps over many streams for recurrent
  models; each step is a :class:`StreamStep` of one :class:`StreamChunk` (or
  :class:`StreamPadding`) per slot, split into :class:`StreamPart` per worker so that a
  stream stays in one worker (NOTE [ Stream schedule ] in ``_stream.py``).

Example:
    >>> from poolloader.samplers import DynamicBatchSampler
    >>> sampler = DynamicBatchSampler([2.0, 3.0, 9.0, 4.0], max_duration=10.0, seed=0)
    >>> sampler.set_epoch(0)
    >>> batches = list(sampler)
    >>> sorted(i for batch in batches for i in batch)
    [0, 1, 2, 3]
"""

from poolloader.samplers._constraint import BatchConstraint
from poolloader.samplers._dynamic import DynamicBatchSampler
from poolloader.samplers._sorted import SortedBatchSampler
from poolloader.samplers._stream import (
    StreamChunk,
    StreamPadding,
    StreamPart,
    StreamSampler,
    StreamStep,
)

__all__ = [
    "BatchConstraint",
    "DynamicBatchSampler",
    "SortedBatchSampler",
    "StreamChunk",
    "StreamPadding",
    "StreamPart",
    "StreamSampler",
    "StreamStep",
]
