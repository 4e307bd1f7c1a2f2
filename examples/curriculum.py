"""A curriculum: double the crop duration at an epoch boundary, in every worker.

Install: pip install -e .   (poolloader and torch are all it needs)

With torch's DataLoader, `loader.dataset.duration = ...` changes only the main
process's copy of the dataset; the workers keep cropping to the old duration.
With poolloader the change reaches every worker, and every batch loaded after
it has the new shape.

Run: python examples/curriculum.py
"""

from __future__ import annotations

import torch

from poolloader import DataLoader, get_worker_info

SAMPLE_RATE = 8000


class Utterances(torch.utils.data.Dataset):
    """Synthetic utterances of 2 to 6 seconds, randomly cropped to ``duration`` seconds."""

    def __init__(self, count: int, duration: float) -> None:
        self.lengths = torch.randint(2 * SAMPLE_RATE, 6 * SAMPLE_RATE, (count,)).tolist()
        self.duration = duration

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        audio = torch.randn(self.lengths[i])
        crop = int(self.duration * SAMPLE_RATE)
        start = int(torch.randint(0, len(audio) - crop + 1, ()).item())
        info = get_worker_info()
        return {
            "audio": audio[start : start + crop],
            "worker": torch.tensor(info.id if info else -1),
        }


def main() -> None:
    torch.manual_seed(0)
    dataset = Utterances(count=64, duration=0.5)
    with DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2) as loader:
        for epoch in range(4):
            if epoch == 2:
                loader.dataset.duration = 2 * loader.dataset.duration
                print(f"epoch {epoch}: duration doubled to {loader.dataset.duration} s")
            shapes = set()
            workers = set()
            for batch in loader:
                shapes.add(tuple(batch["audio"].shape))
                workers.update(batch["worker"].tolist())
            print(f"epoch {epoch}: batch shapes {sorted(shapes)} from workers {sorted(workers)}")


if __name__ == "__main__":
    main()
