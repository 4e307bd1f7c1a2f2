"""lhotse through poolloader: a CutSet, DynamicBucketingSampler, and a dataset that
builds each batch from the CutSet the sampler yields, in a worker.

Install: pip install -e ".[examples]"   (adds lhotse and soundfile)

This is lhotse's own pattern (``DataLoader(dataset, sampler=sampler, batch_size=None)``);
poolloader runs it on a process pool whose workers may start processes of their own.

Run: python examples/lhotse_cuts.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from lhotse import CutSet, Recording, RecordingSet
from lhotse.dataset import DynamicBucketingSampler
from speech_manifest import write_corpus

from poolloader import DataLoader


class PaddedAudio(torch.utils.data.Dataset):
    """Loads the audio of a CutSet and pads it into a (batch, samples) tensor."""

    def __getitem__(self, cuts: CutSet) -> dict[str, torch.Tensor | list[str]]:
        audio = [torch.from_numpy(cut.load_audio()[0]) for cut in cuts]
        lengths = torch.tensor([len(a) for a in audio])
        padded = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)
        return {"audio": padded, "audio_len": lengths, "ids": [cut.id for cut in cuts]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp), "train", 30, seed=3)
        recordings = RecordingSet.from_recordings(
            Recording.from_file(path) for path in sorted((corpus / "wav").glob("*.wav"))
        )
        cuts = CutSet.from_manifests(recordings=recordings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lhotse suggests lazy CutSets for big corpora
            sampler = DynamicBucketingSampler(cuts, max_duration=15.0, num_buckets=3, seed=0)
        with DataLoader(PaddedAudio(), sampler=sampler, batch_size=None, num_workers=2) as loader:
            for epoch in range(2):
                sampler.set_epoch(epoch)
                seen: list[str] = []
                for batch in loader:
                    seconds = batch["audio_len"].sum().item() / 8000
                    seen += batch["ids"]
                    print(
                        f"epoch {epoch}: {tuple(batch['audio'].shape)} ({seconds:.1f} s of audio)"
                    )
                print(f"epoch {epoch}: {len(seen)} cuts in all, {len(set(seen))} distinct")


if __name__ == "__main__":
    main()
