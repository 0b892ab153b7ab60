"""Tests for sam.py and training.train_step with SAM: exactness against AdamW and a naive reference,
the perturbation, the saved-weights buffer, non-finite gradients, checkpoints, gradient accumulation,
DDP (gloo on CPU), torch.compile and bf16 autocast."""
import contextlib
import copy
import math
import os
import socket
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402
from sam import SAM  # noqa: E402
from training import read_stats, train_step as device_train_step  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def train_step(*args, **kwargs):
    """training.train_step, its stats (0-dim device tensors) read as Python numbers as a log step reads them."""
    return read_stats([device_train_step(*args, **kwargs)])[0]

V, T = 64, 16
LR = 1e-2
RHO = 0.05


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(block_size=T, vocab_size=V, n_layer=2, n_head=4, n_embd=32)
    kw.update(overrides)
    return GPT(GPTConfig(**kw))


def make_adamw(model, lr=LR, eps=1e-4):
    # eps 1e-4 rather than the paper's 1e-8: Adam's update g / (|g| + eps) has slope ~ lr / (4 eps) where
    # |g| ~ eps, which would turn float32 round-off (~1e-9) in the gradients of two equivalent computations
    # into differences far above the 1e-6 tolerance; with 1e-4 that amplification is ~25x.
    return torch.optim.AdamW(model.param_groups(0.1), lr=lr, betas=(0.9, 0.95), eps=eps)


def batch(step, B=4, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return x, y


def loss_of(model, x, y, mask=None):
    return model(x, y, loss_mask=mask)[1]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(m1, m2):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


def assert_params_close(m1, m2, atol):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")


def max_param_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


def assert_opt_state_equal(o1, o2):
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1['param_groups'] == s2['param_groups']
    assert s1['state'].keys() == s2['state'].keys() and len(s1['state']) > 0
    for k in s1['state']:
        assert s1['state'][k].keys() == s2['state'][k].keys()
        for name, v in s1['state'][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2['state'][k][name])), (k, name)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    return closure


def naive_sam_step(model, opt, micro_batches, rho, adaptive=False, grad_clip=0.0):
    """An independent, deliberately plain SAM step (Foret et al. 2021; ASAM of Kwon et al. 2021)."""
    params = list(model.parameters())
    opt.zero_grad(set_to_none=True)
    for x, y in micro_batches:
        (loss_of(model, x, y) / len(micro_batches)).backward()
    with torch.no_grad():
        saved = [p.clone() for p in params]
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * p.grad) ** 2).sum() for p in params))
            eps = [rho * p * p * p.grad / norm for p in params]
        else:
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
            eps = [rho * p.grad / norm for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad(set_to_none=True)
    for x, y in micro_batches:
        (loss_of(model, x, y) / len(micro_batches)).backward()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def record_perturbation(sam, model):
    """Wraps sam.restore so that each call records (w + e) - w for every parameter, just before restoring."""
    records = []
    original = sam.restore

    def restore():
        if sam.perturbed_params is not None:
            records.append([(p.detach() - sam.saved_weights[p]).clone() for p in model.parameters()])
        original()
    sam.restore = restore
    return records


def global_norm(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


# ---------------------------------------------------------------- rho = 0 is AdamW

def test_rho_zero_step_closure_is_exactly_adamw():
    m_ref = tiny_model()
    m_sam = copy.deepcopy(m_ref)
    opt_ref = make_adamw(m_ref)
    sam = SAM(make_adamw(m_sam), rho=0.0)
    for step in range(5):
        x, y = batch(step)
        closure_for(m_ref, opt_ref, x, y)()
        opt_ref.step()
        loss = sam.step(closure_for(m_sam, sam, x, y))
        assert torch.isfinite(loss)
    assert_params_equal(m_ref, m_sam)
    assert_opt_state_equal(opt_ref, sam.base_optimizer)
    assert max_param_diff(m_ref, tiny_model()) > 1e-2  # training did move the weights


def test_rho_zero_train_step_is_exactly_adamw():
    m_ref = tiny_model()
    m_sam = copy.deepcopy(m_ref)
    opt_ref, opt_sam = make_adamw(m_ref), make_adamw(m_sam)
    sam = SAM(opt_sam, rho=0.0)
    for step in range(5):
        x, y = batch(step)
        mbs = [(x[:2], y[:2], None), (x[2:], y[2:], None)]
        s_ref = train_step(m_ref, opt_ref, mbs, contextlib.nullcontext(), 0.5)
        s_sam = train_step(m_sam, opt_sam, mbs, contextlib.nullcontext(), 0.5, sam=sam)
        assert s_ref['loss'] == s_sam['loss'] == s_sam['sam_loss']
        assert s_ref['grad_norm'] == s_sam['grad_norm']
        assert s_sam['sam_skipped'] is False
    assert_params_equal(m_ref, m_sam)
    assert_opt_state_equal(opt_ref, opt_sam)


# ---------------------------------------------------------------- against a naive reference

@pytest.mark.parametrize('adaptive', [False, True])
def test_step_matches_naive_reference(adaptive):
    rho = 0.5 if adaptive else RHO  # ASAM's perturbation is scaled by |w| ~ 0.02, so it needs a larger rho
    m_ref, m_sam, m_adamw = tiny_model(), tiny_model(), tiny_model()
    opt_ref, opt_adamw = make_adamw(m_ref), make_adamw(m_adamw)
    sam = SAM(make_adamw(m_sam), rho=rho, adaptive=adaptive)
    for step in range(4):
        x, y = batch(step)
        naive_sam_step(m_ref, opt_ref, [(x, y)], rho, adaptive)
        sam.step(closure_for(m_sam, sam, x, y))
        closure_for(m_adamw, opt_adamw, x, y)()
        opt_adamw.step()
    assert_params_close(m_ref, m_sam, atol=1e-6)
    assert max_param_diff(m_ref, m_adamw) > 1e-4  # SAM is measurably not AdamW here


@pytest.mark.parametrize('adaptive', [False, True])
def test_train_step_matches_naive_reference_with_clipping(adaptive):
    rho, clip = (0.5 if adaptive else RHO), 0.2
    m_ref, m_sam = tiny_model(), tiny_model()
    opt_ref, opt_sam = make_adamw(m_ref), make_adamw(m_sam)
    sam = SAM(opt_sam, rho=rho, adaptive=adaptive)
    for step in range(3):
        x, y = batch(step)
        naive_sam_step(m_ref, opt_ref, [(x[:2], y[:2]), (x[2:], y[2:])], rho, adaptive, grad_clip=clip)
        stats = train_step(m_sam, opt_sam, [(x[:2], y[:2], None), (x[2:], y[2:], None)],
                           contextlib.nullcontext(), clip, sam=sam)
        assert stats['sam_loss'] > stats['loss']  # the ascent step goes uphill
    assert_params_close(m_ref, m_sam, atol=1e-6)


# ---------------------------------------------------------------- the perturbation

def test_first_step_moves_by_rho_along_gradient_and_restore_is_exact():
    model = tiny_model()
    sam = SAM(make_adamw(model), rho=0.3)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    w0 = params_of(model)
    grads = [p.grad.clone() for p in model.parameters()]
    norm = sam.first_step()
    g_norm = global_norm(grads)
    assert abs(norm - g_norm) < 1e-5 * g_norm
    delta = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert abs(global_norm(delta) - 0.3) < 1e-4
    for d, g in zip(delta, grads):
        torch.testing.assert_close(d, 0.3 * g / g_norm, rtol=1e-3, atol=1e-6)
    # (w + e) - e is not w in floating point; restore must copy back, bit-exactly
    sam.restore()
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)
    sam.restore()  # a second restore is a no-op
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)


def test_perturbation_uses_raw_unclipped_gradient():
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = make_adamw(model)
    sam = SAM(opt, rho=RHO)
    records = record_perturbation(sam, model)
    x, y = batch(0)
    loss_of(ref, x, y).backward()
    raw_norm = global_norm([p.grad for p in ref.parameters()])
    grad_clip = 1e-3
    assert raw_norm > 100 * grad_clip
    stats = train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), grad_clip, sam=sam)
    assert len(records) == 1
    assert abs(global_norm(records[0]) - RHO) < 1e-5
    assert abs(stats['ascent_grad_norm'] - raw_norm) < 1e-4 * raw_norm
    assert stats['grad_norm'] > 100 * grad_clip  # reported before clipping


# ---------------------------------------------------------------- memory

def test_saved_weights_buffer_is_allocated_once():
    model = tiny_model()
    opt = make_adamw(model)
    sam = SAM(opt, rho=RHO)
    assert sam.saved_weights is None
    ptrs = []
    for step in range(3):
        x, y = batch(step)
        train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam)
        ptrs.append([sam.saved_weights[p].data_ptr() for p in model.parameters()])
    assert ptrs[0] == ptrs[1] == ptrs[2]
    buffers = list(sam.saved_weights.values())
    assert len(buffers) == len(list(model.parameters()))
    assert sum(b.numel() for b in buffers) == sum(p.numel() for p in model.parameters())
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not param_ptrs & set(ptrs[0])  # a copy, not an alias of the weights


# ---------------------------------------------------------------- non-finite gradients

@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_first_step_skips_on_non_finite_gradient(bad):
    model = tiny_model()
    sam = SAM(make_adamw(model), rho=RHO)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    model.blocks[1].mlp.up_proj.weight.grad[3, 4] = bad
    w0 = params_of(model)
    norm = sam.first_step()
    assert not math.isfinite(norm)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)
    sam.restore()
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)


class GradPoison:
    """A hook that replaces one parameter's gradient by NaN while armed (for the next n backward passes)."""

    def __init__(self, param):
        self.remaining = 0
        param.register_hook(self)

    def __call__(self, grad):
        if self.remaining > 0:
            self.remaining -= 1
            return torch.full_like(grad, float('nan'))
        return grad


def test_train_step_non_finite_ascent_gradient_skips_perturbation():
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt, opt_ref = make_adamw(model), make_adamw(ref)
    sam = SAM(opt, rho=RHO)
    poison = GradPoison(model.wte.weight)
    x, y = batch(0)
    poison.remaining = 1  # only the ascent backward sees a NaN
    stats = train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam)
    assert stats['sam_skipped'] is True
    assert not math.isfinite(stats['ascent_grad_norm'])
    # without the move, the descent gradient is the one at w: the step is plain AdamW's
    train_step(ref, opt_ref, [(x, y, None)], contextlib.nullcontext(), 1.0)
    assert_params_equal(ref, model)
    # and the next step is a normal SAM step again
    stats = train_step(model, opt, [batch(1) + (None,)], contextlib.nullcontext(), 1.0, sam=sam)
    assert stats['sam_skipped'] is False


@pytest.mark.parametrize('use_sam', [False, True])
def test_train_step_never_steps_on_non_finite_grad_norm(use_sam):
    model = tiny_model()
    opt = make_adamw(model)
    sam = SAM(opt, rho=RHO) if use_sam else None
    poison = GradPoison(model.lm_head.weight)
    x, y = batch(0)
    train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam)  # a good step: state exists
    w0 = params_of(model)
    state0 = copy.deepcopy(opt.state_dict())
    poison.remaining = 2 if use_sam else 1  # every backward of the next step is poisoned
    stats = train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam)
    assert poison.remaining == 0
    assert not math.isfinite(stats['grad_norm'])
    if use_sam:
        assert stats['sam_skipped'] is True
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)
        assert p.grad is None
    after = opt.state_dict()
    for k, s in state0['state'].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after['state'][k][name])), (k, name)
    # training recovers on the next good batch
    stats = train_step(model, opt, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam)
    assert math.isfinite(stats['grad_norm'])
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))


# ---------------------------------------------------------------- checkpoints

def test_state_dict_is_base_optimizer_state_and_switching_works():
    x0, y0 = batch(0)
    # SAM's state_dict is the base AdamW's
    m = tiny_model()
    opt = make_adamw(m)
    sam = SAM(opt, rho=RHO)
    train_step(m, opt, [(x0, y0, None)], contextlib.nullcontext(), 1.0, sam=sam)
    assert_opt_state_equal(opt, sam)
    assert sam.state_dict().keys() == opt.state_dict().keys()

    # AdamW checkpoint -> SAM-wrapped AdamW in a fresh process, continuing exactly as the original would
    m_a = tiny_model()
    opt_a = make_adamw(m_a)
    for step in range(2):
        train_step(m_a, opt_a, [batch(step) + (None,)], contextlib.nullcontext(), 1.0)
    ckpt = {'model': copy.deepcopy(m_a.state_dict()), 'opt': copy.deepcopy(opt_a.state_dict())}
    m_b = tiny_model(seed=123)
    m_b.load_state_dict(ckpt['model'])
    opt_b = make_adamw(m_b)
    sam_b = SAM(opt_b, rho=RHO)
    sam_b.load_state_dict(ckpt['opt'])
    sam_a = SAM(opt_a, rho=RHO)
    for step in range(2, 4):
        train_step(m_a, opt_a, [batch(step) + (None,)], contextlib.nullcontext(), 1.0, sam=sam_a)
        train_step(m_b, opt_b, [batch(step) + (None,)], contextlib.nullcontext(), 1.0, sam=sam_b)
    assert_params_equal(m_a, m_b)
    assert_opt_state_equal(opt_a, opt_b)
    assert opt_b.state_dict()['state'][0]['step'] == 4

    # SAM checkpoint -> plain AdamW
    ckpt = {'model': copy.deepcopy(m_a.state_dict()), 'opt': copy.deepcopy(sam_a.state_dict())}
    m_c = tiny_model(seed=321)
    m_c.load_state_dict(ckpt['model'])
    opt_c = make_adamw(m_c)
    opt_c.load_state_dict(ckpt['opt'])
    for step in range(4, 6):
        train_step(m_a, opt_a, [batch(step) + (None,)], contextlib.nullcontext(), 1.0)
        train_step(m_c, opt_c, [batch(step) + (None,)], contextlib.nullcontext(), 1.0)
    assert_params_equal(m_a, m_c)
    assert_opt_state_equal(opt_a, opt_c)


# ---------------------------------------------------------------- gradient accumulation

def test_gradient_accumulation_equals_full_batch():
    m1, m2 = tiny_model(), tiny_model()
    opt1, opt2 = make_adamw(m1), make_adamw(m2)
    sam1, sam2 = SAM(opt1, rho=RHO), SAM(opt2, rho=RHO)
    rec1, rec2 = record_perturbation(sam1, m1), record_perturbation(sam2, m2)
    for step in range(3):
        x, y = batch(step)
        s1 = train_step(m1, opt1, [(x[:2], y[:2], None), (x[2:], y[2:], None)], contextlib.nullcontext(), 1.0, sam=sam1)
        s2 = train_step(m2, opt2, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam2)
        assert abs(s1['loss'] - s2['loss']) < 1e-5 and abs(s1['sam_loss'] - s2['sam_loss']) < 1e-5
        assert abs(s1['ascent_grad_norm'] - s2['ascent_grad_norm']) < 1e-5
        for e1, e2 in zip(rec1[-1], rec2[-1]):  # the same ascent direction
            torch.testing.assert_close(e1, e2, rtol=0, atol=1e-6)
    assert_params_close(m1, m2, atol=1e-5)


def test_negative_rho_raises():
    model = tiny_model()
    with pytest.raises(ValueError):
        SAM(make_adamw(model), rho=-0.01)
    SAM(make_adamw(model), rho=0.0)


# ---------------------------------------------------------------- DDP (gloo, CPU)

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        x, y = batch(0)
        xr, yr = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
        result = {}
        for sync_ascent in (False, True):
            model = tiny_model()
            local = copy.deepcopy(model)  # a plain, non-DDP copy: the gradient on this rank's data alone
            ddp = DDP(model)
            opt = make_adamw(model)
            sam = SAM(opt, rho=RHO, sync_ascent=sync_ascent)
            records = record_perturbation(sam, model)
            stats = train_step(ddp, opt, [(xr, yr, None)], contextlib.nullcontext(), 1.0, sam=sam)
            loss_of(local, xr, yr).backward()
            g = [p.grad for p in local.parameters()]
            g_norm = global_norm(g)
            e_local = [RHO * t / g_norm for t in g]
            result[sync_ascent] = {
                'perturbation': records[0],
                'local_perturbation_diff': max((a - b).abs().max().item() for a, b in zip(records[0], e_local)),
                'params': [p.detach().clone() for p in model.parameters()],
                'stats': stats,
            }
        # torch.compile under DDP, as pretrain.py wraps it (DDP(compile(model))): two micro-batches, so the first
        # backward of each pass runs under no_sync; against the same step in eager mode
        micro_batches = [(xr[:1], yr[:1], None), (xr[1:], yr[1:], None)]
        for compiled in (False, True):
            model = tiny_model()
            opt = make_adamw(model)
            ddp = DDP(torch.compile(model, backend=os.environ.get('TEST_COMPILE_BACKEND', 'aot_eager')) if compiled
                      else model)
            sam = SAM(opt, rho=RHO)
            stats = [read_stats([device_train_step(ddp, opt, micro_batches, contextlib.nullcontext(), 1.0, sam=sam)])[0]
                     for _ in range(2)]
            result[f'accumulated_compiled={compiled}'] = {'params': [p.detach().clone() for p in model.parameters()],
                                                          'stats': stats}
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_ddp_sam(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context('spawn')
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    x, y = batch(0)

    # default: each rank perturbs along its own local gradient (m-sharpness)
    for r in (r0, r1):
        assert r[False]['local_perturbation_diff'] < 1e-6
        assert abs(global_norm(r[False]['perturbation']) - RHO) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(r0[False]['perturbation'], r1[False]['perturbation'])) > 1e-3
    for a, b in zip(r0[False]['params'], r1[False]['params']):
        assert torch.equal(a, b)
    # ... and the step is: mean over ranks of the gradient at each rank's own perturbed point
    model = tiny_model()
    opt = make_adamw(model)
    grads = []
    for rank in range(2):
        m = tiny_model()
        naive_opt = torch.optim.SGD(m.parameters(), lr=0.0)
        xr, yr = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
        loss_of(m, xr, yr).backward()
        g_norm = global_norm([p.grad for p in m.parameters()])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(RHO * p.grad / g_norm)
        naive_opt.zero_grad()
        loss_of(m, xr, yr).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for a, b in zip(r0[False]['params'], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)

    # sync_ascent=True: identical to one process doing SAM on the whole batch
    single = tiny_model()
    opt_single = make_adamw(single)
    sam_single = SAM(opt_single, rho=RHO)
    rec = record_perturbation(sam_single, single)
    stats = train_step(single, opt_single, [(x, y, None)], contextlib.nullcontext(), 1.0, sam=sam_single)
    for r in (r0, r1):
        for a, b in zip(r[True]['perturbation'], rec[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for a, b in zip(r[True]['params'], single.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
        assert abs(r[True]['stats']['grad_norm'] - stats['grad_norm']) < 1e-5
    assert max(abs(a - b).max().item() for a, b in zip(r0[True]['params'], r0[False]['params'])) > 1e-6

    # compiled under DDP with gradient accumulation (no_sync) is the eager step
    for r in (r0, r1):
        eager, compiled = r['accumulated_compiled=False'], r['accumulated_compiled=True']
        for a, b in zip(eager['params'], compiled['params']):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for se, sc in zip(eager['stats'], compiled['stats']):
            assert abs(se['loss'] - sc['loss']) < 1e-5 and abs(se['sam_loss'] - sc['sam_loss']) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(r0['accumulated_compiled=True']['params'],
                                                            tiny_model().parameters())) > 1e-3  # it trained


# ---------------------------------------------------------------- torch.compile and bf16

def _is_compiler_failure(exc):
    """Errors that mean torch.compile's backend cannot run on this machine (not a SAM or model bug)."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    if names & {'BackendCompilerFailed', 'InductorError', 'CppCompileError', 'InvalidCxxCompiler'}:
        return True
    text = str(exc).lower()
    return any(s in text for s in ('c++ compiler', 'cxx compiler', 'backend compiler failed', 'cppcompileerror'))


def test_sam_with_torch_compile():
    """Two SAM steps through a torch.compile'd model match eager. The default backend here is aot_eager
    (Dynamo + AOTAutograd, which is where SAM's in-place weight moves meet the compiled graph) because a
    cold inductor build costs ~30 s on 2 cores; TEST_COMPILE_BACKEND=inductor runs the full compiler."""
    if not hasattr(torch, 'compile'):
        pytest.skip("torch.compile is not available")
    eager = tiny_model()
    compiled_base = tiny_model()
    opt_e, opt_c = make_adamw(eager), make_adamw(compiled_base)
    sam_e, sam_c = SAM(opt_e, rho=RHO), SAM(opt_c, rho=RHO)
    try:
        import torch._dynamo as dynamo
        dynamo.reset()
        compiled = torch.compile(compiled_base, backend=os.environ.get('TEST_COMPILE_BACKEND', 'aot_eager'))
        stats_c = [train_step(compiled, opt_c, [batch(s) + (None,)], contextlib.nullcontext(), 1.0, sam=sam_c)
                   for s in range(2)]
    except Exception as exc:  # noqa: BLE001 - only compiler/backend failures are skipped, see below
        if _is_compiler_failure(exc):
            pytest.skip(f"torch.compile backend unavailable here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    stats_e = [train_step(eager, opt_e, [batch(s) + (None,)], contextlib.nullcontext(), 1.0, sam=sam_e)
               for s in range(2)]
    for se, sc in zip(stats_e, stats_c):
        assert abs(se['loss'] - sc['loss']) < 1e-4 and abs(se['sam_loss'] - sc['sam_loss']) < 1e-4
        assert sc['sam_skipped'] is False
    assert_params_close(eager, compiled_base, atol=1e-4)
    assert max_param_diff(eager, tiny_model()) > 1e-3


def test_sam_bf16_autocast_cpu():
    model = tiny_model()
    w0 = params_of(model)
    opt = make_adamw(model)
    sam = SAM(opt, rho=RHO)
    x, y = batch(0)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :4] = False
    autocast = torch.autocast('cpu', dtype=torch.bfloat16)
    stats = train_step(model, opt, [(x, y, mask)], autocast, 1.0, sam=sam, z_loss=1e-4)
    for k in ('loss', 'sam_loss', 'grad_norm', 'ascent_grad_norm'):
        assert math.isfinite(stats[k]), k
    assert abs(stats['loss'] - math.log(V)) < 0.5
    assert stats['sam_skipped'] is False
    for p, w in zip(model.parameters(), w0):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))


# ---------------------------------------------------------------- no host-device synchronisation

class NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any read of a tensor's value by the host (.item(), bool(), float(): aten._local_scalar_dense), which
    on a GPU would stall the step until the device catches up."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, 'the host read a tensor value'
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('use_sam', [False, True])
def test_train_step_never_reads_device_values_with_fused_adamw(use_sam):
    """With fused AdamW (pretrain.py's optimizer on CUDA) a step, bad or not, never waits for the host: the guards
    decide on the device. A bad step still leaves weights and optimizer state as they were."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=LR, betas=(0.9, 0.95), eps=1e-4, fused=True)
    sam = SAM(opt, rho=RHO) if use_sam else None
    poison = GradPoison(model.lm_head.weight)
    with NoHostReads():
        device_train_step(model, opt, [batch(0) + (None,)], contextlib.nullcontext(), 1.0, sam=sam)
    w0, state0 = params_of(model), copy.deepcopy(opt.state_dict())
    poison.remaining = 2 if use_sam else 1
    with NoHostReads():
        stats = device_train_step(model, opt, [batch(1) + (None,)], contextlib.nullcontext(), 1.0, sam=sam)
    assert poison.remaining == 0 and not math.isfinite(read_stats([stats])[0]['grad_norm'])
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))
    for k, s in state0['state'].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt.state_dict()['state'][k][name])), (k, name)
    with NoHostReads():
        stats = device_train_step(model, opt, [batch(2) + (None,)], contextlib.nullcontext(), 1.0, sam=sam)
    assert math.isfinite(read_stats([stats])[0]['grad_norm'])
    assert any(not torch.equal(p.detach(), w) for p, w in zip(model.parameters(), w0))
    assert all(s['step'].item() == 2 for s in opt.state_dict()['state'].values())  # the bad step was not counted


def test_read_stats_keeps_types_and_order():
    stats = [{'loss': torch.tensor(2.5), 'sam_skipped': torch.tensor(True)},
             {'loss': torch.tensor(float('nan')), 'grad_norm': torch.tensor(1e-3), 'sam_skipped': torch.tensor(False)}]
    out = read_stats(stats)
    assert out[0] == {'loss': 2.5, 'sam_skipped': True}
    assert math.isnan(out[1]['loss']) and out[1]['grad_norm'] == torch.tensor(1e-3).item()
    assert out[1]['sam_skipped'] is False and read_stats([]) == []
