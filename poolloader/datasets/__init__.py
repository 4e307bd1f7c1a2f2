"""Datasets for speech and audio pipelines: manifests, data selection, padding collate.

::

    manifests on disk                      ManifestDataset                     a batch
    ┌─────────────────────────┐  read  ┌───────────────────────────────┐
    │ a/wav.scp  b/wav.scp    ├───────►│ ids, one value per field and  │ ds[i]: files opened,
    │ a/text     b/text       │  once  │ item, the line each came from │ read, closed
    │ utt2dur / train.csv ... │        │ lengths, duration, collate_fn ├──────────┐
    └─────────────────────────┘        └───────────────┬───────────────┘          │
                                                       │ select / select_steps    ▼
                                                       ▼ (order, random, min)   pad_collate
                                          a ManifestDataset of fewer ids   (padded, <key>_len)

* :class:`ManifestDataset` reads Kaldi-style ``id value`` files (several per field
  mix several corpora) or, with :meth:`ManifestDataset.from_table`, CSV/TSV/JSON-lines
  tables, and loads each field lazily in ``__getitem__``: audio through soundfile
  (``pip install poolloader[audio]``), ``.npy`` arrays, text, or a function of yours.
  ``duration`` random-crops audio and may be changed during training.
* :func:`select` and :func:`select_steps` keep part of a dataset the way SpeeChain's
  data selection does: ``order``, ``rev_order``, ``random`` (seeded), and ``min``,
  ``max``, ``middle`` by metadata.
* :func:`pad_collate` (and :class:`PadCollate` for other settings) pads
  variable-length arrays to the longest of the batch and records their lengths.
* :class:`StreamDataset` reads many streams side by side for recurrent models, from a
  random-access ``read(stream, start, stop)`` or an iterator per stream kept in one
  worker, and returns a :class:`StreamBatch` (``data``, ``mask``, ``first``, ...) per
  step of a :class:`~poolloader.samplers.StreamSampler`.

Everything here pickles by reference or cheaply, so it works in spawned workers: a
``ManifestDataset`` keeps what its manifests say in shared memory (``poolloader.SharedList``
and ``SharedDict``), so it pickles to a few kilobytes and every worker maps the same copy.

Example:
    >>> from poolloader import DataLoader  # doctest: +SKIP
    >>> from poolloader.datasets import ManifestDataset, select
    >>> ds = ManifestDataset(
    ...     {"audio": ["a/wav.scp", "b/wav.scp"], "text": ["a/text", "b/text"]},
    ...     lengths=["a/utt2dur", "b/utt2dur"],
    ...     duration=2.0,
    ... )  # doctest: +SKIP
    >>> ds = select(ds, "max", "1.0")  # keep utterances of at least 1 s  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=16, collate_fn=ds.collate)  # doctest: +SKIP
    >>> loader.dataset.duration = 2 * loader.dataset.duration  # doctest: +SKIP
"""

from ._collate import PadCollate, pad_collate
from ._dataset import ManifestDataset
from ._select import select, select_steps
from ._streams import StreamBatch, StreamDataset

__all__ = [
    "ManifestDataset",
    "PadCollate",
    "StreamBatch",
    "StreamDataset",
    "pad_collate",
    "select",
    "select_steps",
]
