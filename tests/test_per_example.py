"""PerExampleNorms against per-sample gradients from torch.func (vmap(grad(...)))."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import gradwatch as gw


# -- models ------------------------------------------------------------------------------
class SeqMLP(nn.Module):
    """Embedding -> Linear on [B, T, d] (ghost and direct shapes) -> LayerNorm -> RMSNorm -> a layer applied twice."""

    def __init__(self, vocab: int = 11, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.wide = nn.Linear(d, d)  # T (r + c) < r c: ghost norm
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.shared = nn.Linear(d, d)  # called twice: per-example gradients summed before the norm
        self.narrow = nn.Linear(d, 3)  # T (r + c) > r c: direct
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.wide(self.emb(x)))
        h = self.rms(self.ln(h))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(torch.tanh(self.narrow(h))).mean(-2)  # [B, 5]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


class CNN(nn.Module):
    """Conv2d/Conv1d with padding modes, groups, stride, dilation; shapes that take the direct and the ghost path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)  # 64 positions, 8 x 27 weight: direct
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 32, 3, padding=1)  # 16 positions, 32 x 72 weight: ghost
        self.c4 = nn.Conv1d(32, 4, 5, stride=2, padding="valid", dilation=2)
        self.c5 = nn.Conv1d(4, 4, 3, padding="same", bias=False, padding_mode="circular")
        self.fc = nn.Linear(4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))  # [B, 32, 4, 4]
        h = torch.tanh(self.c4(h.flatten(2).repeat(1, 1, 2)))  # [B, 4, 12]
        h = torch.tanh(self.c5(h))
        return self.fc(h[..., :4].flatten(1))


def gpt2(layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=layers, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


# -- references --------------------------------------------------------------------------
def reference(model: nn.Module, loss_i, *batch: torch.Tensor) -> torch.Tensor:
    """Per-example contribution norms over all parameters: ||grad of loss_i(example i)||, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = vmap(grad(loss_i), in_dims=(None, *([0] * len(batch))))(params, *batch)
    B = batch[0].shape[0]
    return torch.sqrt(sum(g.reshape(B, -1).double().square().sum(1) for g in grads.values()))


def call(model: nn.Module, params: dict, *xs: torch.Tensor, **kw) -> torch.Tensor:
    return functional_call(model, params, tuple(x[None] for x in xs), {k: v[None] for k, v in kw.items()})


def measured(model: nn.Module, run, steps: int = 1, **kw) -> gw.History:
    watch = gw.GradWatch(model, stats=[gw.PerExampleNorms(**kw)])
    for _ in range(steps):
        model.zero_grad()
        run()
        watch.step()
    watch.close()
    return watch.history


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# -- correctness -----------------------------------------------------------------------------
def test_mlp_matches_torch_func():
    model, B = mlp(), 7
    x, y = torch.randn(B, 6), torch.randint(0, 4, (B,))
    ref = reference(model, lambda p, xi, yi: F.cross_entropy(call(model, p, xi), yi[None]) / B, x, y)
    h = measured(model, lambda: F.cross_entropy(model(x), y).backward())
    assert h.stats["example.norm"].shape == (1, B)
    assert rel(h.stats["example.norm"][0], ref) < 1e-4
    np.testing.assert_allclose(h.stats["example.covered"], [1.0], rtol=1e-5)
    np.testing.assert_array_equal(h.stats["example.micro"][0], np.zeros(B))


def test_sequence_model_embedding_norms_shared_layer():
    model, B = SeqMLP(), 5
    x, y = torch.randint(0, 11, (B, 6)), torch.randint(0, 5, (B,))
    x[1, :2] = 0  # padding tokens
    x[2, 3] = x[2, 1]  # a repeated token: the embedding's rows add
    ref = reference(model, lambda p, xi, yi: F.cross_entropy(call(model, p, xi), yi[None]) / B, x, y)
    h = measured(model, lambda: F.cross_entropy(model(x), y).backward())
    assert rel(h.stats["example.norm"][0], ref) < 1e-4
    np.testing.assert_allclose(h.stats["example.covered"], [1.0], rtol=1e-5)


class Shared(nn.Module):
    """Parameters used by several calls: an embedding twice, a tied head, a grouped conv twice, a layer 6 times."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)  # looked up twice (T^2 > V d on the second) and tied to the head
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=2)  # twice: grouped factors
        self.loop = nn.Linear(d, d)  # 6 calls: per-example gradients summed
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.emb(z).mean(1, keepdim=True)  # [B, T, d]
        h = torch.tanh(self.conv(torch.tanh(self.conv(h.mT)))).mT
        for _ in range(6):
            h = torch.tanh(self.loop(h))
        return self.head(h).mean(1)  # [B, vocab]


def test_parameters_used_several_times_match_torch_func():
    model, B = Shared(), 5
    x, z, y = torch.randint(0, 7, (B, 4)), torch.randint(0, 7, (B, 9)), torch.randint(0, 7, (B,))
    ref = reference(model, lambda p, xi, zi, yi: F.cross_entropy(call(model, p, xi, zi), yi[None]) / B, x, z, y)
    h = measured(model, lambda: F.cross_entropy(model(x, z), y).backward())
    assert rel(h.stats["example.norm"][0], ref) < 1e-4
    np.testing.assert_allclose(h.stats["example.covered"], [1.0], rtol=1e-5)


@pytest.mark.parametrize("T", [1, 31, 64, 96, 101, 128, 256])
@pytest.mark.parametrize("plus", [0.0, 1.0])
def test_factored_square_norms_against_materialised_gradients(T, plus):
    """Every path of the weight(+bias) rule -- one position, full or lower-triangle Gram matrices, direct."""
    from gradwatch.stats.examples import _blocks, _factored_sq, _sym_ghost

    torch.manual_seed(T)
    N, r, c = 3, 24, 40
    L, R = torch.randn(N, T, r), torch.randn(N, T, c)
    Rp = torch.cat([R, torch.full((N, T, 1), plus**0.5)], -1).double()
    ref = (L.double().mT @ Rp).square().sum((1, 2))  # ||L^T [R, sqrt(plus)]||^2, materialised
    assert _blocks(T) == {64: 2, 96: 2, 128: 4, 256: 8}.get(T, 1)
    torch.testing.assert_close(_sym_ghost(L, R, plus).double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(_factored_sq(L, R, plus).double(), ref, rtol=1e-5, atol=0)


def test_long_sequences_lower_triangle_ghost_norms():
    model, B = nn.Sequential(nn.Linear(192, 192), nn.Tanh(), nn.Linear(192, 3)), 3  # T >= 64: blocked Gram matrices
    for T in (64, 101):  # 2 diagonal blocks; odd: the full Gram matrices
        x = torch.randn(B, T, 192)
        ref = reference(model, lambda p, xi: call(model, p, xi).square().mean() / B, x)
        h = measured(model, lambda x=x: model(x).square().mean(0).mean().backward())
        assert rel(h.stats["example.norm"][0], ref) < 1e-4


def test_small_vocabulary_embedding_direct_path():
    model, B = nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 2)), 4  # T^2 > V d: rows scattered per example
    x = torch.randint(0, 3, (B, 9))
    ref = reference(model, lambda p, xi: call(model, p, xi).square().mean() / B, x)
    h = measured(model, lambda: model(x).square().mean(0).mean().backward())
    assert rel(h.stats["example.norm"][0], ref) < 1e-4


def test_batch_dim_1_seq_first():
    model, T, B = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2)), 3, 5
    x = torch.randn(T, B, 4)

    def loss_i(p, xi):  # xi: [T, 4]
        return call(model, p, xi).square().sum() / B

    ref = reference(model, loss_i, x.transpose(0, 1))
    h = measured(model, lambda: model(x).square().sum(0).mean(0).sum().backward(), batch_dim=1)
    assert rel(h.stats["example.norm"][0], ref) < 1e-4


def test_cnn_matches_torch_func():
    model, B = CNN(), 4
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))
    ref = reference(model, lambda p, xi, yi: F.cross_entropy(call(model, p, xi), yi[None]) / B, x, y)
    h = measured(model, lambda: F.cross_entropy(model(x), y).backward())
    assert rel(h.stats["example.norm"][0], ref) < 1e-4
    np.testing.assert_allclose(h.stats["example.covered"], [1.0], rtol=1e-5)


def gpt2_batch(B: int = 3, T: int = 12):
    ids = torch.randint(0, 61, (B, T))
    return ids, torch.arange(T).expand(B, T)


def gpt2_ref(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    B = ids.shape[0]
    return reference(model, lambda p, i, q: call(model, p, i, position_ids=q, labels=i).loss / B, ids, pos)


def test_gpt2_tied_embeddings_match_torch_func():
    model = gpt2()
    ids, pos = gpt2_batch()
    ref = gpt2_ref(model, ids, pos)
    h = measured(model, lambda: model(ids, position_ids=pos, labels=ids).loss.backward())
    assert rel(h.stats["example.norm"][0], ref) < 1e-4
    np.testing.assert_allclose(h.stats["example.covered"], [1.0], rtol=1e-5)


def test_bf16_autocast_within_1e_2():
    model = gpt2()
    ids, pos = gpt2_batch()
    ref = gpt2_ref(model, ids, pos)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, position_ids=pos, labels=ids).loss
        loss.backward()

    h = measured(model, run)
    assert rel(h.stats["example.norm"][0], ref) < 1e-2

    net, B = mlp(), 6
    x, y = torch.randn(B, 6), torch.randint(0, 4, (B,))
    ref = reference(net, lambda p, xi, yi: F.cross_entropy(call(net, p, xi), yi[None]) / B, x, y)

    def run_mlp():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()

    assert rel(measured(net, run_mlp).stats["example.norm"][0], ref) < 1e-2


@pytest.mark.parametrize("own", [True, False])
def test_grad_scaler_norms_are_unscaled(own):
    """With the GradScaler given to the statistic, or only to the watch (the statistic takes the watch's)."""
    model, B = mlp(), 5
    x, y = torch.randn(B, 6), torch.randint(0, 4, (B,))
    ref = reference(model, lambda p, xi, yi: F.cross_entropy(call(model, p, xi), yi[None]) / B, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stat = gw.PerExampleNorms(scaler=scaler if own else None)
    watch = gw.GradWatch(model, scaler=scaler, stats=[stat]).attach(opt)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)  # the watch steps (and unscales) in the optimizer's pre-step hook
        scaler.update()
    watch.close()
    norms = watch.history.stats["example.norm"]
    assert rel(norms[0], ref) < 1e-4 and rel(norms[1], ref) < 1e-4


def test_extreme_example_is_ranked_first():
    net = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    x[5] *= 1000.0  # one corrupt input
    h = measured(net, lambda: F.cross_entropy(net(x), y).backward())
    assert int(np.argmax(h.stats["example.norm"][0])) == 5
    cnn = CNN()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    x[2] *= 1000.0
    h = measured(cnn, lambda: F.cross_entropy(cnn(x), y).backward())
    assert int(np.argmax(h.stats["example.norm"][0])) == 2
    # GPT-2 normalises a scaled input away (LayerNorm): scale one example's loss instead
    model, B = gpt2(), 6
    ids, pos = gpt2_batch(B)
    weight = torch.ones(B, 1)
    weight[4] = 1000.0

    def run():
        logits = model(ids, position_ids=pos).logits[:, :-1]
        tok = F.cross_entropy(logits.reshape(-1, 61), ids[:, 1:].reshape(-1), reduction="none").view(B, -1)
        (tok * weight).mean().backward()

    h = measured(model, run)
    assert int(np.argmax(h.stats["example.norm"][0])) == 4


def test_accumulation_equals_one_large_batch():
    model = gpt2()
    ids, pos = gpt2_batch(B=6)
    big = measured(model, lambda: model(ids, position_ids=pos, labels=ids).loss.backward())

    def accumulate():
        for part in (slice(0, 2), slice(2, 6)):  # micro-batches of 2 and 4: mean loss weighted by size
            loss = model(ids[part], position_ids=pos[part], labels=ids[part]).loss
            (loss * (part.stop - part.start) / 6).backward()

    acc = measured(model, accumulate)
    np.testing.assert_allclose(acc.stats["example.norm"], big.stats["example.norm"], rtol=1e-4)
    np.testing.assert_array_equal(acc.stats["example.micro"][0], [0, 0, 1, 1, 1, 1])


# -- cost ---------------------------------------------------------------------------------------
def test_zero_host_syncs():
    model = gpt2()
    ids, pos = gpt2_batch()
    watch = gw.GradWatch(model, flush_every=10, stats=[gw.PerExampleNorms()])
    for step in range(3):
        model.zero_grad()
        with gw.count_host_syncs() as c:
            model(ids, position_ids=pos, labels=ids).loss.backward()
            watch.step()
        assert (c.syncs, c.host_copies) == (0, 0), step
    watch.close()


def test_every_n_does_no_work_on_unrecorded_steps():
    net = mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))

    def ops(watch: gw.GradWatch | None) -> int:
        net.zero_grad()
        with gw.count_host_syncs() as c:
            F.cross_entropy(net(x), y).backward()
        if watch is not None:
            watch.step()
        return sum(c.ops.values())

    plain = ops(None)
    watch = gw.GradWatch(net, every=3, stats=[gw.PerExampleNorms()])
    counts = [ops(watch) for _ in range(6)]
    watch.close()
    assert counts[1] == counts[2] == counts[4] == counts[5] == plain  # not recorded: nothing added
    assert counts[0] > plain and counts[3] > plain
    h = watch.history
    assert h.steps.tolist() == [0, 3] and not np.isnan(h.stats["example.norm"]).any()


def test_unobserved_passes_do_not_leak_into_the_next_recorded_step():
    net = mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    watch = gw.GradWatch(net, every=2, clipper=gw.ClipByGlobalNorm(1e9), stats=[gw.PerExampleNorms()])
    for _ in range(4):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        watch.step()
    watch.close()
    norms = watch.history.stats["example.norm"]
    assert norms.shape == (2, 4)
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-6)


# -- coverage and arguments ----------------------------------------------------------------------
class WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.gain


def test_uncovered_parameter_warned_once_and_covered_fraction():
    model = WithScale()
    x = torch.randn(5, 4)
    watch = gw.GradWatch(model, stats=[gw.PerExampleNorms()])
    with pytest.warns(UserWarning, match=r"no per-example gradient for gain") as rec:
        for _ in range(2):
            model.zero_grad()
            model(x).square().mean().backward()
            watch.step()
        h = watch.history
    assert sum("gain" in str(w.message) for w in rec) == 1
    watch.close()
    g = {n: p.grad for n, p in model.named_parameters()}
    total2 = sum(v.square().sum() for v in g.values())
    want = float((g["lin.weight"].square().sum() + g["lin.bias"].square().sum()) / total2)
    np.testing.assert_allclose(h.stats["example.covered"], [want, want], rtol=1e-5)
    # the norms are over the covered parameters (lin) only
    B = 5
    params = {k: v.detach() for k, v in model.named_parameters()}
    per = vmap(grad(lambda p, xi: call(model, p, xi).square().mean() / B), in_dims=(None, 0))(params, x)
    ref = torch.sqrt(per["lin.weight"].reshape(B, -1).square().sum(1) + per["lin.bias"].square().sum(1))
    assert rel(h.stats["example.norm"][0], ref) < 1e-4


def test_broadcast_input_is_left_out_with_a_warning():
    model = gpt2(layers=1)
    ids, _ = gpt2_batch()
    with pytest.warns(UserWarning, match=r"transformer\.wpe\.weight.*position_ids"):
        h = measured(model, lambda: model(ids, labels=ids).loss.backward())
    cov = h.stats["example.covered"][0]
    assert 0.0 < cov < 1.0
    assert np.isfinite(h.stats["example.norm"]).all()


def test_more_examples_than_max_examples_warns_and_keeps_the_first():
    net = mlp()
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    with pytest.warns(UserWarning, match="max_examples=4 keeps the first 4"):
        h = measured(net, lambda: F.cross_entropy(net(x), y).backward(), max_examples=4)
    assert h.stats["example.norm"].shape == (1, 4)


def test_history_round_trip(tmp_path):
    net = mlp()
    x, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
    h = measured(net, lambda: F.cross_entropy(net(x), y).backward(), steps=2)
    assert h.stats["example.norm"].shape == (2, 3)  # the width is the most examples seen, not max_examples
    h.save(tmp_path / "run.npz")
    back = gw.History.load(tmp_path / "run.npz")
    np.testing.assert_array_equal(back.stats["example.norm"], h.stats["example.norm"])


def test_close_removes_the_hook():
    net = mlp()
    watch = gw.GradWatch(net, stats=[stat := gw.PerExampleNorms()])
    watch.close()
    net(torch.randn(2, 6)).sum().backward()
    assert stat._pass.uses == {}


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"batch_dim": -1}, ValueError, "batch_dim must be an integer in"),
        ({"batch_dim": 1.0}, TypeError, "batch_dim must be an integer"),
        ({"max_examples": 0}, ValueError, "max_examples must be an integer in"),
        ({"max_examples": True}, TypeError, "max_examples must be an integer"),
        ({"scaler": "amp"}, TypeError, "scaler must be a torch.amp.GradScaler or None"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        gw.PerExampleNorms(**kwargs)


def test_no_warning_for_fully_covered_models():
    net = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measured(net, lambda: net(torch.randn(2, 6)).sum().backward())


# -- forensics: the incidents name the examples ---------------------------------------------------
def test_incident_names_the_planted_example(tmp_path, capsys):
    from gradwatch.cli import main

    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    watch = gw.GradWatch(
        net, every=5, stats=[gw.PerExampleNorms()], recorder=gw.FlightRecorder(before=2, after=1)
    ).attach(opt)
    for step in range(10):
        opt.zero_grad()
        loss = 0.0
        for micro in range(2):  # accumulation: 2 micro-batches of 3
            x, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
            if step == 6 and micro == 1:
                x[2] *= 1e3  # the corrupt example: #5 of step 6, micro-batch 1
            part = F.cross_entropy(net(x), y) / 2
            part.backward()
            loss += float(part.detach())
        opt.step()
        if step == 6:
            watch.mark("loss spike", value=loss)
    watch.close()
    h = watch.history
    assert h.steps.tolist() == [0, 5]
    (inc,) = h.incidents
    top = inc.top_examples(1)[0]
    assert (top.step, top.index, top.micro) == (6, 5, 1)
    assert inc.history.stats["example.norm"].shape == (4, 6)  # every step of the window, all 6 examples
    h.save(tmp_path / "run.npz")
    assert main(["incidents", str(tmp_path / "run.npz"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top examples: step 6 #5 (micro-batch 1)" in out


def test_a_recorded_step_without_a_covered_backward_is_nan():
    net = mlp()
    watch = gw.GradWatch(net, stats=[gw.PerExampleNorms()])
    with torch.no_grad():
        net(torch.randn(2, 6))  # no gradient: nothing to measure
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    watch.step()
    watch.close()
    h = watch.history
    assert np.isnan(h.stats["example.norm"]).all() and np.isnan(h.stats["example.covered"]).all()
