"""A curriculum: the dataset's ``set_epoch`` lengthens the crops every two epochs.

Install: pip install -e .   (poolloader and torch are all it needs)

With torch's DataLoader and ``persistent_workers=True``, ``loader.dataset.set_epoch(e)``
runs in the main process only: the workers keep their own copy of the dataset
and crop to the first duration forever (the run below shows it). With
poolloader the method runs against ``loader.dataset``, what it changes is
recorded, and every worker applies it before the first batch submitted after
the call.

Run: python examples/curriculum.py
"""

from __future__ import annotations

import torch

from poolloader import DataLoader, get_worker_info

SAMPLE_RATE = 8000
#: The curriculum: crops start at FIRST seconds and double every two epochs.
FIRST, LONGEST = 0.5, 2.0


class Utterances(torch.utils.data.Dataset):
    """Synthetic utterances of 2 to 6 seconds, randomly cropped to ``duration`` seconds."""

    def __init__(self, count: int) -> None:
        self.lengths = torch.randint(2 * SAMPLE_RATE, 6 * SAMPLE_RATE, (count,)).tolist()
        self.duration = FIRST

    def set_epoch(self, epoch: int) -> None:
        self.duration = min(LONGEST, FIRST * 2 ** (epoch // 2))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        audio = torch.randn(self.lengths[i])
        crop = int(self.duration * SAMPLE_RATE)
        start = int(torch.randint(0, len(audio) - crop + 1, ()).item())
        info = torch.utils.data.get_worker_info() or get_worker_info()
        return {
            "audio": audio[start : start + crop],
            "worker": torch.tensor(info.id if info else -1),
        }


def train(loader: torch.utils.data.DataLoader, name: str) -> None:
    for epoch in range(4):
        loader.dataset.set_epoch(epoch)
        shapes, workers = set(), set()
        for batch in loader:
            shapes.add(tuple(batch["audio"].shape))
            workers.update(batch["worker"].tolist())
        print(
            f"{name} epoch {epoch}: set_epoch asks for {loader.dataset.duration} s crops; "
            f"batch shapes {sorted(shapes)} from workers {sorted(workers)}"
        )


def main() -> None:
    torch.manual_seed(0)
    options = {"batch_size": 16, "shuffle": True, "num_workers": 2, "persistent_workers": True}
    with DataLoader(Utterances(count=64), **options) as loader:
        train(loader, "poolloader")
    train(torch.utils.data.DataLoader(Utterances(count=64), **options), "torch")


if __name__ == "__main__":
    main()
