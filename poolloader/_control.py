"""The control channel: changes made in the main process reach every worker.

``loader.dataset`` is a tracking view of the dataset (``_tracking.py``): every
change made through it is applied to the main process's dataset and recorded
here, in the :class:`Channel`, as a small message the workers replay.
``loader.broadcast(fn, ...)`` records a call. Changes recorded between two
batch submissions form one message and one *generation*.

NOTE [ Control ordering ]

Guarantee: a change is seen by every batch whose task is submitted after the
change, in every worker, and by no batch submitted before it.

Every task is stamped, in the main process only, with the generation current
when it was submitted (:meth:`Channel.stamp`, which also closes the group of
changes recorded since the previous task). Each worker has one FIFO connection
from the main process, and the pool remembers the generation each worker has
reached. Before sending a worker a task of generation g, the pool sends it the
changes it lacks up to g, and only those. So:

* a worker applies a change exactly before the first task that must see it;
* the pool never gives a worker a task older than the generation it has
  reached (the task waits for a worker that is not ahead of it), so no task
  submitted before a change sees it;
* when nothing changes, nothing extra is sent: tasks carry no generation and
  a change costs one message per worker, sent once, lazily (a worker with no
  task is brought up to date when the next task is submitted, so that it does
  not hold on to the log);
* a worker started to replace a dead one starts from the channel's base
  snapshot of the dataset and catches up the same way.

A change whose value cannot be pickled fails where it is made, before the main
process's dataset is touched, naming the attribute.

NOTE [ Control log ]

The log holds what some worker may still need: the changes after the base
snapshot (for workers started later) and after the oldest generation a live
worker has reached. The base moves forward to snapshots the channel takes of
the main process's dataset whenever the changes logged since the last one
outweigh it (at least :data:`SNAPSHOT_FLOOR`), so with changes every step the
log stays within about twice the dataset's pickled size, and each snapshot's
cost is spread over as many bytes of changes (counting the shared memory the
changes hold, NOTE [ Pinned segments ]). Snapshots are only ever the
start of *new* workers: a live worker is never sent one (that would replace
its dataset object and run ``worker_init_fn`` again). Finding a worker's
changes is a binary search on generation.

NOTE [ Two bases ]

Workers forked from a template start where the template is, the base
generation: the pool sends it the changes no unfinished task predates
(:meth:`Channel.advance_base`). Workers started directly (no template, or
after it died) start from a pickle, the base's pickle, and catch up on the
changes after it. With a template the two part: the template moves on, the
pickle stays until a snapshot replaces it. So the log keeps the changes after
the pickle, not only after the template's generation, and a worker started
directly from it is told the pickle's generation: told the template's, it ran
on the pickled dataset as if it had every change up to there (a template
killed by the out-of-memory killer left the workers started after it loading
the dataset as it was before every change).

NOTE [ Pinned segments ]

A pickled :class:`~poolloader.SharedList` (or anything else on a
:class:`~poolloader._segment.Segment`) names a descriptor of the main process,
and opens only while the main process holds it (NOTE [ Shared segments ]). A
change that assigns one is sent when the next task needs it, and unpickled
when the worker applies it, which may be long after the main process let the
list go: ``loader.dataset.rows = SharedList(a)``, a batch, then
``loader.dataset.rows = SharedList(b)`` while a worker is still busy with the
batch before the one that needs ``a``. So the channel holds every segment that
a pickle it keeps names (collected with :func:`~poolloader._segment.pinning`
while the change, the snapshot or the base is pickled) for as long as it keeps
that pickle, and, once it has dropped it, until every process that may
unpickle it has said it has: the pool calls :meth:`Channel.release` with the
oldest generation its live workers and template have acknowledged (a worker by
finishing a task of that generation, by :class:`~poolloader._messages.Synced`
or by starting there; the template by :class:`~poolloader._messages.Advanced`
or by starting there). Pins collected for a change are held with the next
group of changes sealed, or with a later one (never an earlier one), so they
are released no sooner than what names them.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import pickle
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from . import _pickling, _segment
from ._folding import Run
from ._messages import (
    Changes,
    Path,
    Refresh,
    Replace,
    SetAttr,
    Update,
)
from ._settling import SettlingViews

logger = logging.getLogger("poolloader")

#: Bytes of logged changes after which the channel snapshots the dataset, when
#: the dataset pickles smaller than this. A snapshot costs a pickling of the
#: dataset; below this floor that cost would come back too often for a small
#: dataset changed every step, above it the log of a small dataset grows
#: larger than the dataset itself.
SNAPSHOT_FLOOR = 1 << 20
#: Snapshots kept besides the base. The oldest becomes the base once no
#: unfinished task is older; the newest follows the changes. More would only
#: cost memory (each is a whole dataset).
PENDING_SNAPSHOTS = 2


# ------------------------------------------------------------------ the channel


class _Entry(NamedTuple):
    """A change in the log: its generation, and what it costs to keep."""

    generation: int
    update: Update
    size: int  # about how many bytes it takes when sent
    pins: list[_segment.Segment]  # the segments it names


def _generation_of(entry: _Entry) -> int:
    return entry.generation


class _Snapshot(NamedTuple):
    """A pickle of the dataset at ``generation``, and the segments it names."""

    generation: int
    data: bytes
    pins: list[_segment.Segment]


class Channel:
    """The log of changes the workers may still need (NOTE [ Control log ])."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        # The log, by ascending generation: one list, so that a change is logged by
        # one append, which an interrupt lands before or after (NOTE [ The log
        # and Ctrl-C ]).
        self._entries: list[_Entry] = []
        self._trimmed = 0  # changes at or below this generation were dropped
        self._base_generation = 0
        # The pickle a worker started directly begins from, and its generation:
        # behind the base generation once a template takes changes (NOTE [ Two
        # bases ]).
        self._base: bytes | None = None
        self._base_pickled_at = 0
        self._base_pins: list[_segment.Segment] = []
        self._snapshots: list[_Snapshot] = []  # newer than the base's pickle
        # NOTE [ Pinned segments ]: named by what is recorded but not yet sealed,
        # and by what was dropped, until receivers acknowledge the generation.
        self._open_pins: list[_segment.Segment] = []
        self._retired: list[tuple[int, list[_segment.Segment]]] = []
        self._since_snapshot = 0
        self._open: list[Update] = []  # recorded since the last stamp
        self._run: Run | None = None
        self._source: Any = None
        self._started = False
        self._snapshotting = False
        self.messages_recorded = 0
        # Real-list and real-dict views whose own items C code may write into
        # (NOTE [ Writes into a view's own items ] in _tracking_containers.py).
        self.settling = SettlingViews()

    # -------------------------------------------------------------- state

    @property
    def active(self) -> bool:
        """Whether workers exist that need changes (a pool has started)."""
        return self._started

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def base_generation(self) -> int:
        """The generation new workers (or the template they are forked from) start at."""
        return self._base_generation

    @property
    def has_base(self) -> bool:
        """Whether the base is a pickled snapshot (:attr:`base`)."""
        return self._base is not None

    @property
    def base(self) -> tuple[int, bytes]:
        """``(generation, pickled dataset)`` that a worker started directly begins
        from; the changes after that generation bring it up to date."""
        with self._lock:
            if self._base is None:
                raise RuntimeError("the control channel has no snapshot: no pool is running")
            return self._base_pickled_at, self._base

    @property
    def log_entries(self) -> int:
        """How many generations the log holds (for tests and statistics)."""
        return len(self._entries)

    @property
    def log_bytes(self) -> int:
        """About how many bytes the log and the snapshots besides the base hold."""
        with self._lock:
            return sum(e.size for e in self._entries) + sum(len(s.data) for s in self._snapshots)

    @property
    def holds_released(self) -> bool:
        """Whether segments wait for :meth:`release` (NOTE [ Pinned segments ])."""
        return bool(self._retired)

    @property
    def pinned(self) -> int:
        """How many segments the channel holds for receivers (for tests)."""
        with self._lock:
            kept = [*self._open_pins, *self._base_pins]
            lists = [*(e.pins for e in self._entries), *(s.pins for s in self._snapshots)]
            kept += [p for pins in lists for p in pins]
            kept += [p for _, pins in self._retired for p in pins]
            return len({id(p) for p in kept})

    def attach(self, dataset: Any) -> None:
        """The main process's dataset, which later snapshots pickle."""
        self._source = dataset

    @property
    def source(self) -> Any:
        """The main process's dataset (:meth:`attach`)."""
        return self._source

    def start(self, dataset: bytes | None, *, snapshots: bool = True) -> None:
        """Take ``dataset`` (pickled) as the base for the workers about to start.

        ``None``: new workers start from a template process, which the pool
        keeps at the base generation (:meth:`advance_base`); the channel then
        takes no snapshots. The dataset may also be ``None`` because it cannot be
        pickled outside a process start (``snapshots=False``)."""
        with self._lock:
            self._seal()
            self._base, self._base_generation = dataset, self._generation
            self._base_pickled_at = self._generation
            self._started, self._snapshotting = True, snapshots and dataset is not None
            self._drop_log()

    def provide_base(self, dataset: bytes, pins: list[_segment.Segment]) -> None:
        """The base's pickle, made after :meth:`start` (``None``) while the pool's
        template started, and the segments it names; snapshots are taken from now on."""
        with self._lock:
            self._base, self._base_pins, self._snapshotting = dataset, pins, True

    def stop(self) -> None:
        with self._lock:
            self._base, self._open, self._run = None, [], None
            self._started = False
            self._drop_log()

    def _drop_log(self) -> None:
        """Forget the log, and every pin: no process of a pool is left to need them."""
        self._entries, self._snapshots = [], []
        self._base_pins, self._open_pins, self._retired = [], [], []
        self._trimmed, self._since_snapshot = self._generation, 0

    # --------------------------------------------------------------- pins

    @contextlib.contextmanager
    def pinning(self) -> Iterator[None]:
        """Hold the segments pickled inside the block with the changes recorded
        next (NOTE [ Pinned segments ]): wrap each pickling of a change's values."""
        with _segment.pinning() as pinned:
            yield
        if pinned and self._started:
            with self._lock:
                self._open_pins.extend(pinned)

    def release(self, acknowledged: int) -> None:
        """Let go of the dropped pickles' segments that every receiver has
        unpickled: each live worker and the template acknowledged ``acknowledged``."""
        with self._lock:
            self._retired = [(g, pins) for g, pins in self._retired if g > acknowledged]

    def _retire(self, generation: int, pins: list[_segment.Segment]) -> None:
        """Hold ``pins`` until receivers acknowledge ``generation`` (lock held)."""
        if pins:
            self._retired.append((generation, pins))

    # ---------------------------------------------------------- recording

    def record(self, update: Update, container: Any = None) -> None:
        """Add a change to the group that the next task will see.

        ``container``: the list, dict, array, ... that ``update`` writes into,
        when many writes into it may be folded into its whole contents."""
        with self._lock:
            if not self._started:
                return
            if isinstance(update, (Replace, Refresh)):
                self._start_afresh(update)
                return
            run = self._continue_run(getattr(update, "path", ()), container, atom=False)
            if self._supersedes(update):
                self._open[-1] = update
                return
            self._open.append(update)
            if run is not None:
                run.writes += 1
                if run.writes > run.limit:
                    self._fold(run)

    def recorded_last(self, update: Update) -> bool:
        """Whether ``update`` is the last change recorded (and not sealed yet)."""
        with self._lock:
            return bool(self._open) and self._open[-1] == update

    def _start_afresh(self, update: Replace | Refresh) -> None:
        """A new epoch of non-persistent workers: a generation of its own, and not a
        user's change (not counted in ``messages_recorded``)."""
        self._seal(keep_pins=True)  # the Replace holds them (and the group's)
        data = update.dataset if isinstance(update, Replace) else b""
        entry, grown = self._entry(update, len(data), self._open_pins)
        # From here to the append, no call (NOTE [ The log and Ctrl-C ]).
        self._open_pins = []
        self._generation += 1
        self._since_snapshot += grown
        self._entries.append(entry)
        if data and self._snapshotting:
            self._add_snapshot(self._generation, data, entry.pins)

    def record_atom(self, path: Path, container: Any, key: Any, value: Any) -> None:
        """Record ``container[key] = value`` where key and value are numbers, strings
        or None: immutable, so they are pickled later, together (:class:`~._messages.SetItems`)."""
        with self._lock:
            if not self._started:  # (not the base: fork workers start with none)
                return
            run = self._run
            if run is None or run.container is not container or run.path != path:
                run = self._continue_run(path, container, atom=True)
                assert run is not None  # a container was given
            run.atoms.append((key, value))
            run.writes += 1
            if run.writes > run.limit:
                self._fold(run)

    def _continue_run(self, path: Path, container: Any, atom: bool) -> Run | None:
        """The run a write into ``container`` at ``path`` belongs to: the current
        one if the last write went there too, else a new one (or none)."""
        run = self._run
        same = container is not None and run is not None
        same = same and run.container is container and run.path == path  # type: ignore[union-attr]
        if not (same and atom):
            self._flush_atoms()  # what comes next follows the pending atoms
        if not same:
            self._run = Run.begin(path, container, len(self._open))
        return self._run

    def _flush_atoms(self) -> None:
        if self._run is not None:
            self._run.flush(self._open)

    def _fold(self, run: Run) -> None:
        """Replace the run's writes (and an earlier fold of them) by the container's contents."""
        self._open_pins += run.fold(self._open)

    def _supersedes(self, update: Update) -> bool:
        """Whether ``update`` assigns the attribute the group's last change assigned
        (``rows = SharedList(a)`` then ``rows = SharedList(b)``, also from two
        method calls): nothing can have seen the first value, so it is not sent.
        Besides the message, this spares the workers unpickling a value the main
        process may have let go of already (a replaced SharedList's memory)."""
        if not isinstance(update, SetAttr) or not self._open:
            return False
        last = self._open[-1]
        return isinstance(last, SetAttr) and (last.path, last.name) == (update.path, update.name)

    def stamp(self, settle: bool = True) -> int:
        """Close the group of changes recorded so far; the generation a new task sees.

        ``settle``: first record what C code wrote into views' own items
        (:attr:`settling`); off for the I/O thread, which must not run the
        dataset's code (the next task's stamp records it)."""
        if settle and self.settling:
            self.settling.settle()
        with self._lock:
            self._seal()
            return self._generation

    # NOTE [ The log and Ctrl-C ]: the main process seals the changes recorded
    # for the next task, and logs a new epoch's fresh start, inside iter() and
    # next(), where a KeyboardInterrupt lands between any two calls. The log was
    # four parallel lists (generations, changes, sizes, pins) appended one by one:
    # an interrupt between two appends left them of different lengths, and every
    # later epoch start failed (IndexError), or a lookup paired a generation with
    # another change. And a group cleared before it was logged was lost: the
    # workers never got changes the main process's dataset had. So each change is
    # logged as one entry, built (every call made) before anything is changed;
    # then the group is cleared, the generation moved and the entry appended with
    # no call in between, the append last: an interrupt lands before all of it
    # or after all of it.

    def _seal(self, keep_pins: bool = False) -> None:
        """Log the changes recorded since the last seal as one generation.
        ``keep_pins``: leave the open pins to the entry logged next."""
        self._flush_atoms()
        if not self._open:
            return
        update = self._open[0] if len(self._open) == 1 else Changes(tuple(self._open))  # type: ignore[arg-type]
        entry, grown = self._entry(update, _size(update), [] if keep_pins else self._open_pins)
        # From here to the append, no call (NOTE [ The log and Ctrl-C ]).
        self._open, self._run = [], None
        if not keep_pins:
            self._open_pins = []
        self._generation += 1
        self.messages_recorded += 1
        self._since_snapshot += grown
        self._entries.append(entry)
        self._maybe_snapshot()

    def _entry(self, update: Update, size: int, pins: list[_segment.Segment]) -> tuple[_Entry, int]:
        """The entry logging ``update`` as the next generation, and how much it adds
        to what a snapshot would let go of: the memory the change holds too (a list
        replaced every epoch costs a few hundred bytes of log, and all of its
        records in shared memory)."""
        held = sum(p.size for p in {id(p): p for p in pins}.values())
        return _Entry(self._generation + 1, update, size, pins), size + held

    def _maybe_snapshot(self) -> None:
        newest = self._snapshots[-1].data if self._snapshots else self._base or b""
        if not self._snapshotting or self._source is None:
            return
        if self._since_snapshot <= max(len(newest), SNAPSHOT_FLOOR):
            return
        try:
            with _segment.pinning() as pinned:
                data = pickle.dumps(self._source, protocol=_pickling.PROTOCOL)
        except Exception as exc:  # the log keeps everything: correct, only larger
            logger.debug("no snapshot of the dataset for the control log: %r", exc)
            return
        self._add_snapshot(self._generation, data, pinned)

    def _add_snapshot(self, generation: int, data: bytes, pins: list[_segment.Segment]) -> None:
        # A snapshot not yet the base was never sent: dropped, it needs no pins.
        self._snapshots.append(_Snapshot(generation, data, pins))
        if len(self._snapshots) > PENDING_SNAPSHOTS:
            del self._snapshots[-2]  # keep the oldest (the next base) and the newest
        self._since_snapshot = 0

    # ------------------------------------------------------------ reading

    def updates(self, after: int, upto: int) -> list[Update]:
        """The changes a live worker at generation ``after`` needs to reach ``upto``.

        At most two messages: the newest :class:`Replace` among them (which
        makes everything before it unnecessary), then the rest as one group."""
        with self._lock:
            if after < self._trimmed:
                raise RuntimeError(
                    f"the control log no longer holds generation {after + 1} "
                    f"(trimmed up to {self._trimmed}): a live worker was left behind"
                )
            first = bisect.bisect_right(self._entries, after, key=_generation_of)
            last = bisect.bisect_right(self._entries, upto, key=_generation_of)
            found = [e.update for e in self._entries[first:last]]
        replaces = [i for i, u in enumerate(found) if isinstance(u, Replace)]
        head: list[Update] = []
        if replaces:
            head, found = [found[replaces[-1]]], found[replaces[-1] + 1 :]
        if len(found) <= 1:
            return head + found
        flat: list[Any] = []
        for update in found:
            flat.extend(update.updates if isinstance(update, Changes) else [update])
        return [*head, Changes(tuple(flat))]

    def fresh_start(self, after: int, upto: int) -> int | None:
        """The generation of the newest :class:`Replace` or :class:`Refresh` after
        ``after`` and at most ``upto``: a worker there must start afresh."""
        with self._lock:
            first = bisect.bisect_right(self._entries, after, key=_generation_of)
            last = bisect.bisect_right(self._entries, upto, key=_generation_of)
            for entry in reversed(self._entries[first:last]):
                if isinstance(entry.update, (Replace, Refresh)):
                    return entry.generation
        return None

    def advance_base(self, upto: int) -> list[Update]:
        """Move the base to ``upto`` (a template takes the changes returned). The
        base's pickle stays where it was (NOTE [ Two bases ])."""
        with self._lock:
            after = self._base_generation
        if upto <= after:
            return []
        found = self.updates(after, upto)
        with self._lock:
            self._base_generation = max(self._base_generation, upto)
        return found

    def move_base(self, generation: int) -> None:
        """A new template holds the dataset at ``generation``: the base is there."""
        with self._lock:
            self._retire(self._base_generation, self._base_pins)
            self._base, self._base_generation, self._snapshots = None, generation, []
            self._base_pickled_at = generation
            self._base_pins, self._snapshotting = [], False

    def compact(self, oldest_needed: int, live: list[int]) -> None:
        """Drop what no worker can need.

        The base moves to the newest snapshot at or below ``oldest_needed``
        (the oldest generation of an unfinished task), and changes at or below
        both the base and every ``live`` worker's generation are dropped."""
        with self._lock:
            usable = [s for s in self._snapshots if s.generation <= oldest_needed]
            if usable:
                self._retire(self._base_generation, self._base_pins)
                self._base_pickled_at, self._base, self._base_pins = usable[-1]
                # (a template's base may be ahead of the snapshot, never behind)
                self._base_generation = max(self._base_generation, self._base_pickled_at)
                self._snapshots = [
                    s for s in self._snapshots if s.generation > self._base_pickled_at
                ]
            # What a worker started from the base's pickle must catch up on stays.
            start = self._base_pickled_at if self._base is not None else self._base_generation
            floor = min([start, *live])
            cut = bisect.bisect_right(self._entries, floor, key=_generation_of)
            if cut:
                dropped = self._entries[:cut]
                trimmed = max(self._trimmed, floor)
                self._retire(dropped[-1].generation, [p for e in dropped for p in e.pins])
                # (retired twice, if an interrupt lands here: held a little longer)
                del self._entries[:cut]
                self._trimmed = trimmed


def _size(update: Update) -> int:
    """About how many bytes ``update`` takes when sent."""
    if isinstance(update, Changes):
        return sum(_size(u) for u in update.updates)
    payloads = [getattr(update, n, b"") for n in ("value", "key", "items", "call", "dataset")]
    return 64 + sum(len(p) for p in payloads if isinstance(p, bytes))
