"""A speech-style pipeline: manifests of real WAV files, dynamic batches by duration,
workers, and a curriculum that doubles the crop duration at an epoch boundary.

Install: pip install -e ".[examples]"   (adds soundfile)

1. Writes a small corpus of WAV files (two "corpora", 8 kHz, 1 to 4 seconds) with
   Kaldi-style manifests: ``wav.scp``, ``text`` and ``utt2dur`` per corpus.
2. Reads both corpora into one ManifestDataset (fields loaded lazily in workers).
3. Batches them with DynamicBatchSampler: at most ``max_duration`` seconds of audio
   per batch, similar lengths together.
4. Doubles ``loader.dataset.duration`` (the random-crop length) after two epochs;
   every worker crops to the new length from the next batch on.

Run: python examples/speech_manifest.py [--workers 2] [--dir /tmp/corpus]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from poolloader import DataLoader
from poolloader.datasets import ManifestDataset
from poolloader.samplers import DynamicBatchSampler

SAMPLE_RATE = 8000


def write_corpus(root: Path, name: str, count: int, seed: int) -> Path:
    """WAV files of tones with noise, and their manifests, under ``root/name``."""
    rng = np.random.default_rng(seed)
    corpus = root / name
    (corpus / "wav").mkdir(parents=True, exist_ok=True)
    scp, text, durations = [], [], []
    for i in range(count):
        utt = f"{name}_utt{i:03d}"
        seconds = float(rng.uniform(1.0, 4.0))
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.01 * rng.standard_normal(
            len(t)
        )
        soundfile.write(corpus / "wav" / f"{utt}.wav", audio.astype(np.float32), SAMPLE_RATE)
        scp.append(f"{utt} wav/{utt}.wav")
        text.append(f"{utt} {'hello world' if i % 2 else 'good morning'}")
        durations.append(f"{utt} {len(t) / SAMPLE_RATE:.4f}")
    for file, lines in (("wav.scp", scp), ("text", text), ("utt2dur", durations)):
        (corpus / file).write_text("\n".join(lines) + "\n")
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the corpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        corpora = [
            write_corpus(root, "train_a", 24, seed=1),
            write_corpus(root, "train_b", 16, seed=2),
        ]
        dataset = ManifestDataset(
            {"audio": [c / "wav.scp" for c in corpora], "text": [c / "text" for c in corpora]},
            lengths=[c / "utt2dur" for c in corpora],
            duration=0.5,
        )
        sampler = DynamicBatchSampler(dataset.lengths, max_duration=20.0, num_buckets=4, seed=0)
        print(f"{len(dataset)} utterances, {dataset.lengths.sum():.1f} s of audio")
        with DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        collate_fn=dataset.collate) as loader:  # fmt: skip
            for epoch in range(4):
                if epoch == 2:
                    loader.dataset.duration = 2 * loader.dataset.duration
                    print(f"epoch {epoch}: crop duration doubled to {loader.dataset.duration} s")
                sampler.set_epoch(epoch)
                samples, utterances = set(), 0
                for batch in loader:
                    samples.add(int(batch["audio"].shape[1]))
                    utterances += len(batch["text"])
                print(f"epoch {epoch}: {len(loader)} batches, {utterances} utterances, "
                      f"crop lengths {sorted(samples)} samples")  # fmt: skip


if __name__ == "__main__":
    main()
