"""Train a small GRU on many long signals at once, carrying its state across batches.

Install: pip install -e .   (poolloader and torch are all it needs)

Truncated backpropagation through time: each signal is cut into chunks of
``CHUNK_SIZE`` steps, and row ``b`` of batch ``t + 1`` continues row ``b`` of batch ``t``.
So the GRU's hidden state is carried from one batch to the next (detached, so gradients
stop at the chunk boundary), reset for the rows where a new signal begins (``first``),
and the loss ignores padding (``mask``). The model learns to predict each signal's next
value; its loss goes down epoch after epoch.

Signals are noisy sines, one frequency per signal, read at random access by two workers.

Run: python examples/streams_gru.py
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from poolloader import DataLoader
from poolloader.datasets import StreamBatch, StreamDataset
from poolloader.samplers import StreamSampler

NUM_SIGNALS = 24
BATCH_SIZE = 16
CHUNK_SIZE = 25
HIDDEN = 16
EPOCHS = 4


def signal_lengths() -> list[int]:
    return np.random.default_rng(0).integers(100, 300, NUM_SIGNALS).tolist()


def read_signal(stream: int, start: int, stop: int) -> torch.Tensor:
    """Time steps ``[start, stop)`` of signal ``stream``: (value, next value) pairs."""
    rng = np.random.default_rng(stream)
    frequency, phase = rng.uniform(0.05, 0.3), rng.uniform(0, 2 * np.pi)
    t = np.arange(start, stop + 1)
    noise = np.random.default_rng([stream, start]).normal(0, 0.05, t.size)
    values = np.sin(frequency * t + phase) + noise
    return torch.tensor(np.stack([values[:-1], values[1:]], axis=1), dtype=torch.float32)


class NextValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, state = self.gru(x, state)
        return self.out(hidden), state


def train_step(
    model: NextValue, optimizer: torch.optim.Optimizer, batch: StreamBatch, state: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """One chunk of every row: reset new rows, predict, masked loss, carry the state."""
    state = state.detach() * (~batch.first).float()[None, :, None]  # new stream: fresh state
    x, target = batch.data[..., :1], batch.data[..., 1:]  # [T, B, 1] each
    prediction, state = model(x, state)
    mask = batch.mask[..., None].float()
    loss = ((prediction - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), state


def main() -> None:
    torch.manual_seed(0)
    model = NextValue()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sampler = StreamSampler(signal_lengths(), batch_size=BATCH_SIZE, chunk_size=CHUNK_SIZE,
                            shuffle=True, seed=0)  # fmt: skip
    with DataLoader(StreamDataset(read_signal), sampler=sampler, batch_size=None,
                    num_workers=2) as loader:  # fmt: skip
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            state = torch.zeros(1, BATCH_SIZE, HIDDEN)
            losses = []
            for batch in loader:
                loss, state = train_step(model, optimizer, batch, state)
                losses.append(loss)
            print(f"epoch {epoch}: {len(losses)} batches, loss {np.mean(losses):.4f}")


if __name__ == "__main__":
    main()
