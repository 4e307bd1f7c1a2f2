"""Field loaders: what turns a manifest value into what an item holds.

A loader is either the name of a built-in one or a user function
``load(value) -> object``. Built-ins:

========== =================================================================
name       what the item holds
========== =================================================================
audio      the audio file read by soundfile: float32 tensor, time first
npy        the ``.npy`` file read by :func:`numpy.load`
text       the manifest value itself (a transcript, a speaker id, ...)
text_file  the contents of a UTF-8 text file, trailing newline removed
int        the value as ``int``
float      the value as ``float``
========== =================================================================

``audio``, ``npy`` and ``text_file`` take a path (relative paths are resolved
by the dataset); the others and user functions take the value as written.

# NOTE [ Audio layout and cropping ]
Audio is time first: ``(samples,)`` for mono, ``(samples, channels)`` otherwise,
which is how soundfile returns it and what ``pad_collate`` pads by default
(axis 0), the same axis as ``(frames, features)`` arrays from ``.npy`` files.
With a crop duration, the start is drawn from torch's global generator
(``torch.randint``), which torch's and poolloader's workers seed per batch, so a
seeded run crops the same windows. Fields of one item whose files have the same
number of frames share one window (a noisy/clean pair stays aligned).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch

Loader = str | Callable[[Any], Any]
"""A built-in loader's name or a picklable module-level function ``value -> object``."""

BUILTIN_LOADERS = ("audio", "float", "int", "npy", "text", "text_file")
"""The names a field's loader may take; see the module docstring."""

PATH_LOADERS = frozenset({"audio", "npy", "text_file"})
"""Built-in loaders whose value is a file path."""

AUDIO_SUFFIXES = frozenset(
    {".aif", ".aiff", ".au", ".flac", ".mp3", ".ogg", ".opus", ".sph", ".wav"}
)
"""Suffixes that make a field's loader default to ``"audio"``."""

SUFFIX_LOADERS = {".npy": "npy", ".txt": "text_file"} | dict.fromkeys(AUDIO_SUFFIXES, "audio")
"""Default loader by the suffix of a field's first value; anything else is ``"text"``."""

CropStarts = dict[tuple[int, int], int]
"""Crop starts drawn for one item, by (frames in file, frames to read)."""


def infer_loader(value: Any) -> str:
    """Guess a field's loader from one of its values: by file suffix, else ``"text"``."""
    if not isinstance(value, str):
        return "text"
    suffix = value[value.rfind(".") :].lower() if "." in value else ""
    return SUFFIX_LOADERS.get(suffix, "text")


def check_picklable(function: object, what: str) -> None:
    """Refuse a function that worker processes could not receive.

    Spawned workers get functions by pickling, which records a module-level name;
    lambdas and functions defined inside other functions have none.

    Args:
        function: the callable to check.
        what: how to name it in the error, e.g. ``"the loader of field 'audio'"``.

    Raises:
        TypeError: ``function`` is a lambda, a nested function, or does not pickle.
    """
    qualname = getattr(function, "__qualname__", "")
    fix = "define it with def at module level and pass that function instead"
    if getattr(function, "__name__", "") == "<lambda>":
        raise TypeError(
            f"{what} is a lambda, which worker processes cannot receive (spawn pickles "
            f"functions by their module-level name); {fix}"
        )
    if "<locals>" in qualname:
        raise TypeError(
            f"{what} is {qualname}, a function defined inside another function, which worker "
            f"processes cannot receive (spawn pickles functions by module-level name); {fix}"
        )
    try:
        pickle.dumps(function)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled for worker processes ({exc}); {fix}") from exc


def choose_loaders(
    first_values: Mapping[str, Any], given: Mapping[str, Loader], numeric: str | None
) -> dict[str, Loader]:
    """Pick each field's loader: the one given, else a guess (``"float"`` for a lengths field).

    Args:
        first_values: each field's first value, to guess from.
        given: loaders the user chose, by field name.
        numeric: the field that holds lengths, if any.

    Raises:
        ValueError: ``given`` names an unknown field or an unknown built-in loader.
        TypeError: a loader is neither a name nor a picklable function.
    """
    unknown = sorted(set(given) - set(first_values))
    if unknown:
        raise ValueError(
            f"loaders names field(s) {unknown} that the dataset does not have; "
            f"its fields are {sorted(first_values)}"
        )
    chosen: dict[str, Loader] = {}
    for name, value in first_values.items():
        if name in given:
            chosen[name] = _check_loader(name, given[name])
        else:
            guess = infer_loader(value)
            chosen[name] = "float" if name == numeric and guess == "text" else guess
    return chosen


def _check_loader(name: str, loader: object) -> Loader:
    """Validate one user-given loader."""
    if isinstance(loader, str):
        if loader not in BUILTIN_LOADERS:
            raise ValueError(
                f"the loader of field {name!r} should be one of {list(BUILTIN_LOADERS)} or a "
                f"function, but got {loader!r}"
            )
        return loader
    if not callable(loader):
        raise TypeError(
            f"the loader of field {name!r} should be a loader name or a function, "
            f"but got {type(loader).__name__}: {loader!r}"
        )
    check_picklable(loader, f"the loader of field {name!r}")
    return loader


def load_value(loader: str, value: Any) -> Any:
    """Run a built-in loader other than ``"audio"`` on a value (a path for path loaders)."""
    if loader == "npy":
        return np.load(value, allow_pickle=False)
    if loader == "text_file":
        with open(value, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    if loader == "int":
        return int(value)
    if loader == "float":
        return float(value)
    return value


def import_soundfile() -> ModuleType:
    """Import soundfile, or say how to install it.

    Raises:
        ImportError: soundfile (or its libsndfile library) is not installed.
    """
    try:
        import soundfile
    except (ImportError, OSError) as exc:
        raise ImportError(
            "audio fields are read with the soundfile package, which could not be imported "
            f"({exc}); install it with: pip install poolloader[audio]"
        ) from exc
    return soundfile


def read_audio(path: str, duration: float | None, starts: CropStarts) -> tuple[torch.Tensor, int]:
    """Read an audio file, or a random ``duration``-second crop of it.

    Args:
        path: the audio file.
        duration: seconds to crop to; ``None`` reads the whole file, and a file no
            longer than ``duration`` is read whole (the collate pads it).
        starts: crop starts already drawn for this item, shared by its audio fields.

    Returns:
        A float32 tensor, ``(samples,)`` for mono or ``(samples, channels)``, and the
        sample rate.
    """
    soundfile = import_soundfile()
    with soundfile.SoundFile(path) as file:
        start, count = crop_window(file.frames, file.samplerate, duration, starts)
        if start:
            file.seek(start)
        data = file.read(count, dtype="float32", always_2d=False)
        sample_rate = int(file.samplerate)
    return torch.from_numpy(data), sample_rate


def crop_window(
    frames: int, sample_rate: int, duration: float | None, starts: CropStarts
) -> tuple[int, int]:
    """Return ``(start, count)`` of the frames to read; see NOTE [ Audio layout and cropping ]."""
    if duration is None:
        return 0, frames
    count = max(1, round(duration * sample_rate))
    if count >= frames:
        return 0, frames
    key = (frames, count)
    if key not in starts:
        starts[key] = int(torch.randint(0, frames - count + 1, (1,)).item())
    return starts[key], count


def audio_seconds(path: str) -> float:
    """Return an audio file's duration in seconds, read from its header."""
    info = import_soundfile().info(path)
    return float(info.frames) / float(info.samplerate)
