"""Corpora on disk for the ManifestDataset tests: WAV files, Kaldi-style
manifests and tables, written under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from poolloader.datasets import ManifestDataset

RATE = 16000


def write_wav(path: Path, frames: int, channels: int = 1, rate: int = RATE) -> np.ndarray:
    """Write a ramp (sample k of channel c is k / frames + c) exactly, as float WAV; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(frames, dtype=np.float32) / frames
    data = ramp if channels == 1 else np.stack([ramp + c for c in range(channels)], axis=1)
    sf.write(path, data, rate, subtype="FLOAT")
    return data


def write_lines(path: Path, *lines: str) -> Path:
    """Write a text manifest, one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def count_words(value: str) -> int:
    """A module-level loader: spawn workers can receive it by name."""
    return len(value.split())


def write_corpora(tmp_path: Path) -> dict[str, Path]:
    """Two corpora, a/ (3 items) and b/ (2 items), with wav.scp, text, utt2dur, utt2num_samples.

    Both use the same relative file names (wav/1.wav ...) with different lengths, so
    reading the right file proves paths resolve against their own manifest.
    """
    frames = {"a": [8000, 16000, 4000], "b": [12000, 2000]}
    for corpus, sizes in frames.items():
        root = tmp_path / corpus
        keys = [f"{corpus}{i + 1}" for i in range(len(sizes))]
        for i, size in enumerate(sizes):
            write_wav(root / "wav" / f"{i + 1}.wav", size)
        write_lines(root / "wav.scp", *(f"{k} wav/{i + 1}.wav" for i, k in enumerate(keys)))
        write_lines(root / "text", *(f"{k} words of  {k} here" for k in keys))
        write_lines(root / "utt2dur", *(f"{k} {s / RATE}" for k, s in zip(keys, sizes)))
        write_lines(root / "utt2num_samples", *(f"{k} {s}" for k, s in zip(keys, sizes)))
    return {"a": tmp_path / "a", "b": tmp_path / "b", "root": tmp_path}


def mixed(corpora: dict[str, Path], **options: object) -> ManifestDataset:
    """The two corpora mixed: audio and text from both."""
    a, b = corpora["a"], corpora["b"]
    return ManifestDataset(
        {"audio": [a / "wav.scp", b / "wav.scp"], "text": [a / "text", b / "text"]},
        **options,  # type: ignore[arg-type]
    )


ROWS = [
    {"id": "t1", "audio": "wav/1.wav", "text": 'say "hi", then go', "duration": 0.5},
    {"id": "t2", "audio": "wav/2.wav", "text": "it's plain", "duration": 1.0},
]


def write_table(path: Path, format: str, rows: list[dict[str, object]]) -> Path:
    """Write rows as CSV (quoted), TSV (unquoted) or JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    if format == "jsonl":
        lines = [json.dumps(row) for row in rows]
    else:
        sep = "," if format == "csv" else "\t"
        quote = (lambda v: '"' + str(v).replace('"', '""') + '"') if format == "csv" else str
        lines = [sep.join(columns)] + [sep.join(quote(row[c]) for c in columns) for row in rows]
    return write_lines(path, *lines)
