"""Seeding the random generators of dataset code.

Two policies (the loader's ``seeding`` option):

``"batch"`` (default)
    Before each batch is loaded, Python's ``random``, NumPy's global generator
    and torch's default generator are seeded from ``(base_seed, epoch,
    position)``. A batch's random augmentations then depend neither on which
    worker loaded it nor on how many workers there are, and a resumed run
    continues exactly. A batch the loader splits over the workers (a
    ``StreamDataset`` step) is seeded again for each of its parts
    (:func:`seed_part`), so that it too draws the same for any number of workers.

``"worker"``
    torch's policy: each worker is seeded once with ``base_seed + worker_id``
    when it starts (and again each epoch when workers are not persistent);
    batches draw from the worker's stream in whatever order the worker gets them.

NOTE [ Seeding ]: under both policies a worker starts seeded exactly as torch
seeds one (``random`` and torch with ``base_seed + worker_id``, NumPy with
torch's ``_generate_state``), so ``worker_init_fn`` sees torch's
``torch.initial_seed()``, ``get_worker_info().seed`` and generators. A
generator that ``worker_init_fn`` seeds or draws from is the user's from then
on: per-batch seeding leaves it alone, so ``torch.manual_seed(12345)`` in
``worker_init_fn`` holds in every batch, as it does with torch. The others are
seeded per batch from the first batch on.
"""

from __future__ import annotations

import _random
import array
import ctypes
import hashlib
import random
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.random  # NOTE [ Imported before the fork ]
import torch

# NOTE [ Imported before the fork ]: NumPy 2 imports ``numpy.random`` on first
# use of ``np.random``, 15-60 ms. A template process that had not used it by the
# time it forked its workers left every worker to import it again while starting
# (each one, each epoch with ``persistent_workers=False``). Imported with this
# module, it is in the template (and the fork server, and the main process for
# ``fork``) before any worker is forked.

SEEDING_POLICIES = ("batch", "worker")
SEED_MASK = 2**63 - 1


def batch_digest(base_seed: int, epoch: int, position: int) -> bytes:
    """The seed of one batch: a 16-byte BLAKE2b digest of the three numbers, read
    as four little-endian 32-bit words for NumPy and its first 63 bits for
    ``random`` and torch (0.5 µs; NumPy's ``SeedSequence`` mixes as well in 8 µs,
    paid on every batch)."""
    key = (
        base_seed.to_bytes(16, "little", signed=True)
        + epoch.to_bytes(16, "little", signed=True)
        + position.to_bytes(16, "little", signed=True)
    )
    return hashlib.blake2b(key, digest_size=16).digest()


#: The generators per-batch seeding sets, by the names :func:`changed_since` uses.
GENERATORS = ("random", "numpy", "torch")


#: The seed of the batch being loaded and the generators left alone, between
#: :func:`seed_batch` and :func:`end_batch` (for :func:`seed_part`).
_loading: tuple[bytes, frozenset[str]] | None = None


def seed_batch(
    base_seed: int, epoch: int, position: int, leave: frozenset[str] = frozenset()
) -> None:
    """Seed ``random``, NumPy and torch for batch ``position`` of ``epoch``, except
    the generators named in ``leave`` (those ``worker_init_fn`` took over), until
    :func:`end_batch`."""
    global _loading
    digest = batch_digest(base_seed, epoch, position)
    _loading = digest, leave
    _seed(digest, leave)


def end_batch() -> None:
    """The batch :func:`seed_batch` seeded for is loaded."""
    global _loading
    _loading = None


def seed_part(*key: int) -> None:
    """While a batch loads under per-batch seeding, seed its generators again from
    the batch's seed and ``key``, which names a part of the batch (a chunk a
    ``StreamDataset`` reads): the part's random draws then depend on the batch and
    the part only, not on which process loads which parts of the batch, in what
    order. Otherwise (``seeding="worker"``, no loader) it does nothing."""
    if _loading is None:
        return
    digest, leave = _loading
    named = digest + b"".join(k.to_bytes(16, "little", signed=True) for k in key)
    _seed(hashlib.blake2b(named, digest_size=16).digest(), leave)


def _seed(digest: bytes, leave: frozenset[str]) -> None:
    # 63 bits, as torch's worker seeds have: code that puts torch.initial_seed()
    # into a tensor (int64) keeps working.
    seed64 = int.from_bytes(digest[:8], "little") & SEED_MASK
    if "random" not in leave:
        random.seed(seed64)
    if "torch" not in leave:
        # The CPU generator only: torch.manual_seed also seeds every accelerator's
        # generators, which costs ~0.2 ms, too much to pay for every batch.
        torch.default_generator.manual_seed(seed64)
    if "numpy" not in leave:
        _NUMPY.seed(digest)


def generator_states() -> tuple[Any, Any, torch.Tensor]:
    """The states of ``random``, NumPy's global generator and torch's CPU generator."""
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def set_generator_states(states: tuple[Any, Any, torch.Tensor]) -> None:
    """Put back states :func:`generator_states` returned."""
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.default_generator.set_state(states[2])


def changed_since(before: tuple[Any, Any, torch.Tensor]) -> frozenset[str]:
    """The generators (of :data:`GENERATORS`) whose state differs from ``before``."""
    now = generator_states()
    changed = set()
    if now[0] != before[0]:
        changed.add("random")
    if not _same_numpy_state(now[1], before[1]):
        changed.add("numpy")
    if not torch.equal(now[2], before[2]):
        changed.add("torch")
    return frozenset(changed)


def _same_numpy_state(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for x, y in zip(a, b, strict=True)
    )


def worker_seed(base_seed: int, worker_id: int) -> int:
    """torch's seed for worker ``worker_id`` (``WorkerInfo.seed``)."""
    return base_seed + worker_id


def seed_worker(base_seed: int, worker_id: int) -> int:
    """torch's per-worker seeding; returns the worker's seed (``WorkerInfo.seed``)."""
    from torch.utils.data._utils.worker import _generate_state

    seed = worker_seed(base_seed, worker_id)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(_generate_state(base_seed, worker_id))
    return seed


@contextmanager
def own_random_state() -> Iterator[None]:
    """Run a block with its own random state and put the caller's back afterwards
    (``random``, NumPy's global generator and torch's CPU generator). The block
    seeds the generators it uses: NumPy's may have been drawn from on entry."""
    saved = _PYTHON.save(), _NUMPY.save(), torch.default_generator.get_state()
    try:
        yield
    finally:
        _PYTHON.restore(saved[0])
        _NUMPY.restore(saved[1])
        torch.default_generator.set_state(saved[2])


# NOTE [ Saving NumPy's global state ]: ``np.random.get_state`` and ``set_state``
# copy MT19937's 624 words one by one in Python-level code, 130-160 µs each, paid
# for every batch a ``num_workers=0`` loader seeds (seven times torch's whole
# cost for a tiny batch). The words and the position are plain memory behind the
# generator's ``ctypes.state_address``: a copy of those 2,500 bytes says whether
# the caller drew since the state was last put back. If not, the full state kept
# then is still right (the cached normal deviate, the one part not in those bytes,
# only changes with a draw, which moves the position, or with ``set_state``;
# whether ``set_state`` put one back is told by drawing a normal deviate, which
# takes a cached one without touching the words).
# Putting a state back copies the bytes in after ``np.random.seed(0)``, which
# clears the cached deviate, as the state had none; a state with one goes back
# through ``set_state``. The layout is checked against ``get_state`` once per
# generator; where it differs, or the global generator is not MT19937
# (``np.random.set_bit_generator``), both directions take the slow path.

_MT19937_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos
_MT19937_KEY = 624 * 4

# NOTE [ Seeding NumPy through CPython's twister ]: ``np.random.seed`` with four
# words costs 21-25 µs, nearly all of it NumPy's checks and conversions of the
# array (a TypeError caught, ``asarray``, two ``astype``, range checks); the
# seeding itself, MT19937's ``init_by_array``, is a few microseconds of C. It was
# the largest single cost of a worker's tiny batch. CPython's ``random`` runs the
# same reference ``init_by_array`` (Python's ``seed(n)`` keys it with the 32-bit
# words of ``n``, lowest first), so a private ``_random.Random`` seeded with the
# digest as one integer holds exactly the words NumPy would compute; they are
# copied into NumPy's state after ``np.random.seed(0)``, which resets what seeding
# resets (the cached normal deviate) and leaves the position where seeding
# leaves it (624: the next draw generates). 9-12 µs in all. Used only where it is
# exact: the integer must need all four words (its top word not zero, else
# Python keys with fewer), the words' place in the ``_random.Random`` object is
# found and checked once against ``getstate``, and the whole path is checked once
# against ``np.random.seed`` itself; anything else takes ``np.random.seed``.


def _twister_words_in(twister: Any) -> int:
    """Where a ``_random.Random`` (or an instance of a subclass, as ``random``'s
    own) keeps its 624 words: the offset at which its memory holds what
    ``getstate`` says, its position in the 4 bytes before; 0 if nowhere, or where
    ``id()`` is not the object's address (not CPython)."""
    if sys.implementation.name != "cpython":
        return 0
    internal = _random.Random.getstate(twister)
    words = array.array("I", internal[:624]).tobytes()
    position = struct.pack("=i", internal[624])
    last = type(twister).__basicsize__ - _MT19937_KEY
    at = id(twister)
    return next(
        (
            offset
            for offset in range(4, last + 1, 4)
            if ctypes.string_at(at + offset - 4, 4 + _MT19937_KEY) == position + words
        ),
        0,
    )


class _NumpyState:
    """Saves and restores NumPy's global generator, quickly where it can."""

    def __init__(self) -> None:
        self._checked: Any = None  # the bit generator whose layout was checked
        self._layout_ok = False
        self._last: tuple[bytes, Any] | None = None  # (bytes, full state) last put back
        self._twister: Any = None  # NOTE [ Seeding NumPy through CPython's twister ]
        self._twister_words = -1  # where its words sit in it; -1 unchecked, 0 unusable

    def _address(self) -> int | None:
        get = getattr(np.random, "get_bit_generator", None)  # NumPy 1.25 and newer
        generator = get() if get is not None else None
        if type(generator) is not np.random.MT19937:
            return None
        address = int(generator.ctypes.state_address)
        if generator is not self._checked:
            self._checked, self._last = generator, None
            state: Any = np.random.get_state()
            expected = np.asarray(state[1], dtype=np.uint32).tobytes() + struct.pack("=i", state[2])
            self._layout_ok = ctypes.string_at(address, _MT19937_BYTES) == expected
        return address if self._layout_ok else None

    def seed(self, digest: bytes) -> None:
        """``np.random.seed`` with the four little-endian 32-bit words of ``digest``
        (NOTE [ Seeding NumPy through CPython's twister ])."""
        if digest[12:] != b"\0\0\0\0":
            address = self._address()
            if address is not None and self._twister_usable():
                np.random.seed(0)
                self._twister.seed(int.from_bytes(digest, "little"))
                ctypes.memmove(address, id(self._twister) + self._twister_words, _MT19937_KEY)
                return
        np.random.seed(np.frombuffer(digest, dtype=np.uint32))

    def _twister_usable(self) -> bool:
        if self._twister_words < 0:
            self._twister_words = 0
            self._twister = _random.Random()
            found = _twister_words_in(self._twister)
            if found and self._twister_agrees(found):
                self._twister_words = found
        return self._twister_words > 0

    def _twister_agrees(self, words_at: int) -> bool:
        """Whether seeding through the twister, its words at ``words_at``, leaves
        NumPy's global generator as ``np.random.seed`` does (the caller's state is
        put back)."""
        saved = self.save()
        try:
            digest = bytes(range(101, 117))
            np.random.seed(np.frombuffer(digest, dtype=np.uint32))
            expected = np.random.get_state()
            np.random.standard_normal()  # a cached deviate, which seeding must clear
            self._twister_words = words_at
            self.seed(digest)
            return _same_numpy_state(np.random.get_state(), expected)
        finally:
            self._twister_words = 0
            self.restore(saved)

    def save(self) -> tuple[bytes | None, Any]:
        address = self._address()
        if address is None:
            return None, np.random.get_state()
        raw = ctypes.string_at(address, _MT19937_BYTES)
        if self._last is not None and self._last[0] == raw:
            # The words are as last put back, with no cached deviate, unless
            # set_state put one back since: a normal draw tells (a cached deviate
            # comes without touching the words). It leaves the generator drawn
            # from, which the block, seeding it, does not see.
            deviate = float(np.random.standard_normal())
            if ctypes.string_at(address, _MT19937_BYTES) == raw:
                return raw, (*self._last[1][:3], 1, deviate)
            return raw, self._last[1]
        return raw, np.random.get_state()

    def restore(self, saved: tuple[bytes | None, Any]) -> None:
        raw, full = saved
        address = self._address()
        if raw is None or address is None or full[3]:  # (full[3]: a cached normal deviate)
            np.random.set_state(full)
            self._last = None
            return
        np.random.seed(0)
        ctypes.memmove(address, raw, _MT19937_BYTES)
        self._last = raw, full


_NUMPY = _NumpyState()


# NOTE [ Saving random's state ]: ``random.getstate`` builds a tuple of 625 ints
# and ``setstate`` reads one back, 12-17 and 7 µs, paid around every batch a
# ``num_workers=0`` loader seeds. The words and the position are plain memory in
# ``random``'s generator object (NOTE [ Seeding NumPy through CPython's twister ]
# finds where), so saving copies those 2,500 bytes and the cached normal deviate
# (``gauss_next``, an attribute), and putting back copies them in again. Where the
# memory is not found to hold what ``getstate`` says (not CPython, another
# layout), both directions take ``getstate``/``setstate``.


class _PythonState:
    """Saves and restores ``random``'s global generator, quickly where it can."""

    def __init__(self) -> None:
        self._words = -1  # where random's generator keeps its words; -1 unchecked, 0 unusable

    def _start(self, generator: Any) -> int | None:
        """The address of ``generator``'s position, its words after it; ``None``
        where they cannot be copied."""
        if self._words < 0:
            self._words = _twister_words_in(generator)
        return id(generator) + self._words - 4 if self._words else None

    def save(self) -> tuple[bytes | None, Any]:
        generator: Any = random._inst  # what random's functions use
        start = self._start(generator)
        if start is None:
            return None, random.getstate()
        return ctypes.string_at(start, 4 + _MT19937_KEY), generator.gauss_next

    def restore(self, saved: tuple[bytes | None, Any]) -> None:
        raw, rest = saved
        generator: Any = random._inst
        start = self._start(generator)
        if raw is None or start is None:
            random.setstate(rest)
            return
        ctypes.memmove(start, raw, len(raw))
        generator.gauss_next = rest


_PYTHON = _PythonState()
