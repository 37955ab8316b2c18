"""One corrupt example in a tiny language model's run, and the flight recorder naming it.

    python examples/per_example/run.py                 # ~20 s on 2 cores
    python examples/per_example/run.py --steps 120 --corrupt-step 90 --out runs/per_example

A 2-layer GPT-2 (built from ``GPT2Config``, tied embeddings) learns a synthetic
language -- each sequence counts upwards modulo the vocabulary from a random
start -- with gradient accumulation (2 micro-batches of 4 sequences per
step). One row of the data set is corrupt: random tokens. The loader reaches
it at some step; its loss is high, the loop marks the step
(``watch.mark("loss spike")``) and the flight recorder keeps the steps around
it with :class:`gradwatch.PerExampleNorms`' columns. The incident's top
example -- step, index within the step, micro-batch -- mapped through the
indices the loop kept per step, is the corrupt row of the data set.

Nothing is downloaded: the model is built from a config and the data generated.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw

VOCAB, SEQ, MICRO, ACCUM = 32, 24, 4, 2


def make_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def make_data(n: int, corrupt: int, gen: torch.Generator) -> TensorDataset:
    """``n`` counting sequences; row ``corrupt`` is random tokens."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    seqs = (start + torch.arange(SEQ)) % VOCAB
    seqs[corrupt] = torch.randint(0, VOCAB, (SEQ,), generator=gen)
    return TensorDataset(torch.arange(n), seqs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--corrupt-step", type=int, default=90, help="the step whose batch holds the corrupt row")
    ap.add_argument("--out", type=Path, default=None, help="save the history (run.npz) and figures here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    per_step = MICRO * ACCUM
    n = per_step * args.steps
    order = torch.randperm(n, generator=gen)
    corrupt_row = int(order[args.corrupt_step * per_step + 5])  # example #5 of that step: micro-batch 1
    data = make_data(n, corrupt_row, gen)
    loader = DataLoader(torch.utils.data.Subset(data, order.tolist()), batch_size=MICRO)  # a fixed shuffled order

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watch = gw.GradWatch(
        model,
        every=10,  # the sparse log
        stats=[gw.PerExampleNorms()],
        recorder=gw.FlightRecorder(before=4, after=2),
    ).attach(optimizer)
    pos = torch.arange(SEQ).expand(MICRO, SEQ)  # position_ids per example: the position embedding is covered

    indices: dict[int, list[int]] = {}  # step -> the data set's rows, in the order of example.norm
    keep = watch.flush_every + 4 + 2  # incidents are cut at a flush: up to flush_every + before + after steps back
    ema = math.nan
    batches = iter(loader)
    for step in range(args.steps):
        optimizer.zero_grad()
        indices[step] = []
        loss = 0.0
        for _ in range(ACCUM):
            idx, ids = next(batches)
            indices[step] += idx.tolist()
            part = model(ids, position_ids=pos, labels=ids).loss / ACCUM
            part.backward()
            loss += float(part.detach())  # the loop's own signal (one read per step, as most loops log)
        optimizer.step()
        if step > 20 and loss > 3 * ema:
            watch.mark("loss spike", value=loss)
        ema = loss if math.isnan(ema) else 0.9 * ema + 0.1 * loss
        for old in [s for s in indices if s < step - keep]:  # what a flushed incident's window can still name
            del indices[old]
    watch.close()

    h = watch.history
    print(gw.forensics.format_incidents(h, top=3))
    result: dict = {"corrupt_row": corrupt_row, "found_row": None}
    if h.incidents:
        top = h.incidents[0].top_examples(1)[0]
        result["found_row"] = found = indices.get(top.step, [None] * per_step)[top.index]
        print(
            f"\nlargest contribution: step {top.step}, example #{top.index} (micro-batch {top.micro}), "
            f"norm {top.norm:.3g} -> data set row {found}; the corrupt row is {corrupt_row}"
        )
        others = h.incidents[0].history.stats["example.norm"]
        print(f"median per-example norm in the window: {float(torch.tensor(others).nanmedian()):.3g}")
    print(f"example.covered (min over the log): {h.stats['example.covered'].min():.4f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        h.save(args.out / "run.npz")
        try:
            import matplotlib

            matplotlib.use("Agg")
            window = h.incidents[0].history
            gw.plot_stats_heatmap(window, "example.norm").figure.savefig(args.out / "example_norms.png")
            gw.plot_stats(window, ["example.norm"], log=True).figure.savefig(args.out / "example_max.png")
        except ImportError:
            print("matplotlib not installed: no figures")
        print(f"wrote {args.out}/run.npz; try: gradwatch incidents {args.out}/run.npz")
    return result


if __name__ == "__main__":
    main()
