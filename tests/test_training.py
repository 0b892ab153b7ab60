"""Tests for training.py: learning-rate schedules, estimate_loss and plain (non-SAM) train_step."""
import contextlib
import copy
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402
from training import estimate_loss, lr_at, read_stats, train_step as device_train_step  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def train_step(*args, **kwargs):
    """training.train_step, its stats (0-dim device tensors) read as Python numbers as a log step reads them."""
    return read_stats([device_train_step(*args, **kwargs)])[0]

PEAK = 3e-4


def approx(a, b, tol=1e-12):
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------- lr_at

@pytest.mark.parametrize('schedule', ['cosine', 'wsd', 'constant'])
def test_warmup_is_linear_and_reaches_peak(schedule):
    warmup, max_iters = 10, 100
    lrs = [lr_at(it, PEAK, max_iters, warmup, schedule, anneal_fraction=0.2) for it in range(warmup + 1)]
    assert 0 < lrs[0] < PEAK / 5
    assert approx(lrs[warmup], PEAK)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(s > 0 for s in steps)
    assert all(approx(s, steps[0], 1e-9) for s in steps)  # one straight line up to the peak
    assert all(lr < PEAK for lr in lrs[:-1])


def test_no_warmup_starts_at_peak():
    for schedule in ('cosine', 'wsd', 'constant'):
        assert approx(lr_at(0, PEAK, 100, 0, schedule, anneal_fraction=0.1), PEAK)


@pytest.mark.parametrize('min_lr_ratio', [0.1, 0.0])
def test_cosine(min_lr_ratio):
    warmup, max_iters = 10, 110
    min_lr = min_lr_ratio * PEAK

    def lr(it):
        return lr_at(it, PEAK, max_iters, warmup, 'cosine', min_lr_ratio=min_lr_ratio)
    assert approx(lr(max_iters), min_lr)
    assert abs(lr(max_iters)) < 1e-15 or min_lr_ratio > 0
    assert approx(lr(max_iters + 50), min_lr)  # stays there
    assert approx(lr(warmup + (max_iters - warmup) // 2), (PEAK + min_lr) / 2)  # halfway through the decay
    decay = [lr(it) for it in range(warmup, max_iters + 1)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    # a cosine, not a line: slow at both ends, fastest in the middle
    assert decay[0] - decay[1] < decay[50] - decay[51]
    assert decay[-2] - decay[-1] < decay[50] - decay[51]
    assert lr(warmup + 25) > (PEAK + min_lr) / 2 + 0.3 * (PEAK - min_lr) / 2


@pytest.mark.parametrize('min_lr_ratio', [0.1, 0.0])
def test_wsd(min_lr_ratio):
    warmup, max_iters, frac = 10, 1000, 0.123
    anneal_start = max_iters - round(frac * max_iters)  # 877
    min_lr = min_lr_ratio * PEAK

    def lr(it):
        return lr_at(it, PEAK, max_iters, warmup, 'wsd', anneal_fraction=frac, min_lr_ratio=min_lr_ratio)
    assert all(lr(it) == PEAK for it in range(warmup, anneal_start + 1))
    assert lr(anneal_start + 1) < PEAK
    assert approx(lr(max_iters), min_lr)
    assert approx(lr(max_iters + 10), min_lr)
    if min_lr_ratio == 0:
        assert abs(lr(max_iters)) < 1e-15
    decay = [lr(it) for it in range(anneal_start, max_iters + 1)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert all(approx(s, (PEAK - min_lr) / (max_iters - anneal_start), 1e-6) for s in steps)  # linear
    mid = anneal_start + (max_iters - anneal_start + 1) // 2
    assert approx(lr(mid), PEAK - (mid - anneal_start) / (max_iters - anneal_start) * (PEAK - min_lr))


def test_wsd_full_anneal_starts_right_after_warmup():
    warmup, max_iters = 20, 200

    def lr(it):
        return lr_at(it, PEAK, max_iters, warmup, 'wsd', anneal_fraction=1.0)
    assert approx(lr(warmup), PEAK)
    assert lr(warmup + 1) < PEAK
    assert approx(lr(max_iters), 0.1 * PEAK)
    halfway = warmup + (max_iters - warmup) // 2
    assert approx(lr(halfway), PEAK - 0.5 * 0.9 * PEAK)
    # the decay never starts before warmup ends, even when the anneal fraction says it should
    assert approx(lr_at(warmup, PEAK, max_iters, warmup, 'wsd', anneal_fraction=0.95), PEAK)


def test_wsd_differs_from_cosine_and_constant():
    kw = dict(learning_rate=PEAK, max_iters=1000, warmup_iters=10)
    assert lr_at(500, lr_schedule='wsd', anneal_fraction=0.1, **kw) == PEAK
    assert lr_at(500, lr_schedule='cosine', **kw) < PEAK
    assert lr_at(950, lr_schedule='wsd', anneal_fraction=0.1, **kw) < PEAK


def test_constant():
    for it in (10, 11, 500, 1000, 5000):
        assert lr_at(it, PEAK, 1000, 10, 'constant') == PEAK


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        lr_at(50, PEAK, 100, 10, 'linear')


# ---------------------------------------------------------------- estimate_loss

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32))


def fixed_batches(n=3, B=2, T=16):
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        x = torch.randint(0, 64, (B, T), generator=g)
        y = torch.randint(0, 64, (B, T), generator=g)
        mask = None if i != 1 else torch.rand(B, T, generator=g) < 0.5
        out.append((x, y, mask))
    return out


@pytest.mark.parametrize('start_in_train_mode', [True, False])
def test_estimate_loss(start_in_train_mode):
    model = tiny_model()
    with torch.no_grad():  # make the batches' losses clearly different from each other
        model.lm_head.weight.mul_(30)
    batches = fixed_batches()
    with torch.no_grad():
        per_batch = [model(x, y, loss_mask=m)[1].item() for x, y, m in batches]
    tokens = [y.numel() if m is None else int(m.sum()) for _, y, m in batches]
    assert max(per_batch) - min(per_batch) > 1e-3
    model.train(start_in_train_mode)
    modes = []

    def get_batch(i):
        modes.append(model.training)
        return batches[i]
    result = estimate_loss(model, get_batch, len(batches), contextlib.nullcontext())
    # per trained token: batch i weighs by its number of loss-mask tokens
    assert abs(result - sum(l * n for l, n in zip(per_batch, tokens)) / sum(tokens)) < 1e-6
    assert abs(result - sum(per_batch) / len(per_batch)) > 1e-6  # ...which is not the mean of the batch means
    assert modes == [False] * len(batches)  # evaluated in eval mode, each fixed batch once
    assert model.training == start_in_train_mode
    assert all(p.grad is None for p in model.parameters())


def test_estimate_loss_is_deterministic_across_calls():
    model = tiny_model()
    batches = fixed_batches()
    a = estimate_loss(model, lambda i: batches[i], 3, contextlib.nullcontext())
    b = estimate_loss(model, lambda i: batches[i], 3, contextlib.nullcontext())
    assert a == b and math.isfinite(a)


# ---------------------------------------------------------------- train_step without SAM

def test_train_step_clips_and_reports_unclipped_norm():
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-4)
    opt_ref = torch.optim.AdamW(ref.param_groups(0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-4)
    x, y, _ = fixed_batches(n=1, B=4)[0]
    clip = 1e-3
    for _ in range(3):
        stats = train_step(model, opt, [(x[:2], y[:2], None), (x[2:], y[2:], None)], contextlib.nullcontext(), clip)
        opt_ref.zero_grad()
        loss = ref(x, y)[1]
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ref.parameters()))
        assert abs(stats['grad_norm'] - norm) < 1e-5 * norm and norm > 10 * clip
        assert abs(stats['loss'] - loss.item()) < 1e-5
        assert 'sam_loss' not in stats and 'sam_skipped' not in stats
        with torch.no_grad():
            for p in ref.parameters():
                p.grad.mul_(clip / norm)
        opt_ref.step()
        assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_train_step_passes_z_loss():
    x, y, _ = fixed_batches(n=1)[0]
    stats = {}
    for z in (0.0, 0.5):
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stats[z] = train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, z_loss=z)
        with torch.no_grad():
            expected = tiny_model()(x, y, z_loss=z)[1].item()
        assert abs(stats[z]['loss'] - expected) < 1e-5
    assert stats[0.5]['loss'] > stats[0.0]['loss'] + 1e-3


# ---------------------------------------------------------------- keep_freed_memory
FAULTS_PER_STEP = """
import contextlib, resource, sys, torch
sys.path.insert(0, {repo!r})
from model import GPT, GPTConfig
from training import keep_freed_memory, train_step
torch.set_num_threads(1)
if {keep}:
    keep_freed_memory()
model = GPT(GPTConfig(block_size=128, vocab_size=1024, n_layer=2, n_head=2, n_embd=64))  # cpu_small's shape
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
x = torch.randint(0, 1024, (32, 128))
for _ in range(3):  # the first steps fault their memory in either way
    train_step(model, optimizer, [(x, x, None)], contextlib.nullcontext(), 1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    train_step(model, optimizer, [(x, x, None)], contextlib.nullcontext(), 1.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's mallopt")
def test_keep_freed_memory_stops_each_step_faulting_its_logits_in_anew():
    """By default glibc unmaps the step's 16 MB logits (and their gradient) when freed and maps them fresh in the next
    step: thousands of page faults a step. With keep_freed_memory the freed pages are reused."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {keep: float(subprocess.run([sys.executable, '-c', FAULTS_PER_STEP.format(repo=repo, keep=keep)],
                                         capture_output=True, text=True, check=True).stdout)
              for keep in (False, True)}
    assert faults[False] > 4096 // 2, faults  # the control: at least half of the logits' 4 kB pages, every step
    assert faults[True] < faults[False] / 3, faults
