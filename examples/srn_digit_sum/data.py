"""The digit-sum data of NNDL practice 6.1.1, generated locally and deterministically.

Each example is a sequence of L digits whose first two digits are the
addends, the rest zeros except one random distractor digit; the label is the
sum of the first two digits (19 classes, 0..18). Only the first two positions
matter, so the task measures how far back a recurrent network can carry
information.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

LENGTHS = (5, 10, 15, 20, 25, 30, 35)
SPLITS = (("train", 3), ("dev", 1), ("test", 1))


def generate(lengths=LENGTHS) -> dict[int, dict[str, list[tuple[list[int], int]]]]:
    """All splits for all lengths, from one seeded numpy stream (the book's recipe).

    The stream is consumed in the book's order (every length, every split), so
    the data of one length does not depend on which lengths you ask for.

    Returns:
        ``{length: {split: [(digits, label), ...]}}``.
    """
    random.seed(0)
    np.random.seed(0)
    out: dict[int, dict[str, list[tuple[list[int], int]]]] = {}
    for length in LENGTHS:
        out[length] = {}
        for split, copies in SPLITS:
            examples = []
            for n1 in range(10):
                for n2 in range(10):
                    base = [n1, n2] + [0] * (length - 2)
                    for _ in range(copies):
                        idx = np.random.randint(2, length)
                        val = np.random.randint(0, 10)
                        seq = list(base)
                        seq[idx] = val
                        examples.append((seq, n1 + n2))
            out[length][split] = examples
    return {k: v for k, v in out.items() if k in lengths}


def write(root: str | os.PathLike, lengths=LENGTHS) -> Path:
    """Write ``root/<L>/{train,dev,test}.txt`` (lines ``"d d ... d\\tlabel"``); returns ``root``."""
    root = Path(root)
    for length, splits in generate(lengths).items():
        folder = root / str(length)
        folder.mkdir(parents=True, exist_ok=True)
        for split, examples in splits.items():
            lines = "".join(" ".join(map(str, seq)) + f"\t{label}\n" for seq, label in examples)
            (folder / f"{split}.txt").write_text(lines)
    return root


def load(root: str | os.PathLike, length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read (generating first if needed) the splits of one length as int64 arrays."""
    folder = Path(root) / str(length)
    if not all((folder / f"{s}.txt").exists() for s, _ in SPLITS):
        write(root, [length])
    out = {}
    for split, _ in SPLITS:
        xs, ys = [], []
        for line in (folder / f"{split}.txt").read_text().splitlines():
            digits, label = line.split("\t")
            xs.append([int(d) for d in digits.split()])
            ys.append(int(label))
        out[split] = (np.array(xs, dtype=np.int64), np.array(ys, dtype=np.int64))
    return out
