"""Many text streams read side by side, in temporally coherent batches.

Install: pip install -e .   (poolloader and torch are all it needs)

The picture from pytorch-stream-dataloader: stream ``a`` is the text "aaaa...", stream
``b`` is "bbbb...", and so on, of different lengths. Each batch row shows the time steps
it holds as ``a_0;a_1;a_2;``: row ``b`` of a batch continues row ``b`` of the batch before
it, until its stream ends and the row starts the next stream (marked "<- new stream", the
moment a recurrent model resets that row's state). When no stream is left, rows are
padding.

Each stream is read by an iterator (like a file or a video decoder, it only goes
forward), and that iterator stays in the worker that opened it: the two workers each
serve half of the rows.

Run: python examples/streams_text.py
"""

from __future__ import annotations

import numpy as np

from poolloader import DataLoader
from poolloader.datasets import StreamDataset
from poolloader.samplers import StreamSampler

LETTERS = "abcdefghij"
LENGTHS = [9, 4, 7, 12, 3, 8, 6, 5, 10, 4]  # stream i is LETTERS[i] * LENGTHS[i]
BATCH_SIZE = 4
CHUNK_SIZE = 3


def text_stream(stream: int):
    """The chunks of one stream: each row is (character code, time step)."""
    text = np.frombuffer((LETTERS[stream] * LENGTHS[stream]).encode(), dtype=np.uint8)
    for start in range(0, len(text), CHUNK_SIZE):
        codes = text[start : start + CHUNK_SIZE].astype(np.int64)
        yield np.stack([codes, np.arange(start, start + len(codes))], axis=1)


def show(batch) -> list[str]:
    """One line per row: its time steps as ``a_0;a_1;``, and whether it starts a stream."""
    lines = []
    for row in range(batch.data.shape[1]):
        steps = batch.data[:, row][batch.mask[:, row]].tolist()
        text = "".join(f"{chr(code)}_{t};" for code, t in steps) or "(padding)"
        lines.append(text + ("   <- new stream" if batch.first[row] else ""))
    return lines


def main() -> None:
    sampler = StreamSampler(LENGTHS, batch_size=BATCH_SIZE, chunk_size=CHUNK_SIZE)
    dataset = StreamDataset(iterate=text_stream)
    with DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2) as loader:
        for number, batch in enumerate(loader, start=1):
            print(f"- batch{number}")
            print("\n".join(show(batch)))
            print()


if __name__ == "__main__":
    main()
