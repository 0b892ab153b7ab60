"""The cheaper SAM variants of pretrain.py: SAM every k-th step (sam_interval) and Momentum-SAM (optimizer=msam).
Each equals a reference loop built from training.train_step, counts the forward/backward tokens it took, runs under
DDP, and resumes bit for bit after a kill."""
import contextlib
import os

import pytest
import torch

from data import load_meta, open_tokens, train_batch
from model import GPT, GPTConfig
from sam import SAM
from test_reliability import assert_same_tensors, checkpoint, kill_at, ok, read_log, without_speed
from training import lr_at, train_step

pytestmark = pytest.mark.usefixtures('one_thread')
# 12 iterations of 2 micro-batches of 4 x 32 tokens; pretrain.py's other defaults (AdamW 0.9/0.95, wd 0.1,
# clip 1, cosine)
STEPS, ACCUM, BATCH, BLOCK, LR, WARMUP = 12, 2, 4, 32, 3e-3, 2
PRETRAIN = ['--n_layer=1', '--n_head=2', '--n_embd=32', f'--block_size={BLOCK}', f'--batch_size={BATCH}',
            f'--gradient_accumulation_steps={ACCUM}', f'--max_iters={STEPS}', f'--warmup_iters={WARMUP}',
            f'--learning_rate={LR}', '--eval_interval=3', '--eval_iters=2', '--log_interval=1', '--device=cpu',
            '--dtype=float32']
VARIANTS = {'sam_every_2nd': ['--optimizer=sam', '--sam_interval=2'], 'msam': ['--optimizer=msam', '--sam_rho=0.3'],
            'msam_every_3rd': ['--optimizer=msam', '--sam_rho=0.3', '--sam_interval=3'],
            'looksam_every_3rd': ['--optimizer=sam', '--sam_interval=3', '--looksam_alpha=0.7']}


def tiny_model():
    return torch.nn.Linear(6, 3), torch.randn(16, 6), torch.randn(16, 3)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_momentum_perturbation_is_minus_rho_m_over_its_norm_and_restore_is_exact():
    torch.manual_seed(0)
    model, x, y = tiny_model()
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    assert sam.first_step_along_momentum() == 0.0 and sam.perturbed_params is None  # no moment before the first step
    for _ in range(3):
        loss_of(model, x, y).backward()
        sam.base_optimizer.step()
        sam.zero_grad()
    w = [p.detach().clone() for p in model.parameters()]
    m = [sam.base_optimizer.state[p]['exp_avg'] for p in model.parameters()]
    norm = torch.sqrt(sum((t ** 2).sum() for t in m))
    assert float(sam.first_step_along_momentum()) == pytest.approx(float(norm), rel=1e-6)
    for p, w0, m0 in zip(model.parameters(), w, m):
        torch.testing.assert_close(p - w0, -0.1 * m0 / norm, rtol=1e-5, atol=1e-7)
    sam.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


def test_looksam_keeps_the_ascent_gradients_component_orthogonal_to_the_gradient_and_adds_it_between():
    torch.manual_seed(2)
    model, x, y = tiny_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.1, looksam=True)  # lr 0: the weights stay at w
    loss_of(model, x, y).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    sam.first_step()
    sam.zero_grad()
    loss_of(model, x, y).backward()
    g_s = torch.cat([p.grad.flatten() for p in model.parameters()])
    sam.second_step()
    u = g / g.norm()
    g_v = g_s - (g_s @ u) * u
    kept = torch.cat([sam.kept_component[p].flatten() for p in model.parameters()])
    torch.testing.assert_close(kept, g_v, rtol=1e-4, atol=1e-6)  # u comes from (w + e) - w: rounded
    assert abs(float(kept @ u)) < 1e-6 * float(g_s.norm())  # orthogonal to the gradient
    sam.zero_grad()
    loss_of(model, x[:8], y[:8]).backward()  # a plain step between SAM steps
    g_plain = torch.cat([p.grad.flatten() for p in model.parameters()])
    sam.add_kept_component(0.7)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]),
                               g_plain + 0.7 * g_plain.norm() / kept.norm() * kept, rtol=1e-5, atol=1e-7)


def test_train_step_along_momentum_takes_the_gradient_at_the_perturbed_point_then_clips_and_steps_from_w():
    torch.manual_seed(1)
    model, x, y = tiny_model()
    reference = copy_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    sam = SAM(opt, rho=0.2)
    batches = [(x[:8], y[:8], None), (x[8:], y[8:], None)]
    for step in range(3):
        train_step(LossModel(model), opt, batches, contextlib.nullcontext(), 0.05, sam, along_momentum=True)
        # by hand: move along -m/||m|| (nothing at the first step), gradient there, back, clip, step
        with torch.no_grad():
            saved = [p.clone() for p in reference.parameters()]
            if step:
                m = [ref_opt.state[p]['exp_avg'] for p in reference.parameters()]
                norm = torch.sqrt(sum((t ** 2).sum() for t in m))
                for p, m0 in zip(reference.parameters(), m):
                    p.sub_(0.2 * m0 / (norm + 1e-12))
        sum(loss_of(reference, bx, by) / 2 for bx, by, _ in batches).backward()
        with torch.no_grad():
            for p, w0 in zip(reference.parameters(), saved):
                p.copy_(w0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert sam.perturbed_params is None


def copy_of(model):
    copy = torch.nn.Linear(6, 3)
    copy.load_state_dict(model.state_dict())
    return copy


class LossModel(torch.nn.Module):
    """train_step calls model(x, y, loss_mask=, z_loss=, loss_only=) -> (logits, loss), as model.py's GPT does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, y, loss_mask=None, z_loss=0.0, loss_only=False):
        return None, loss_of(self.inner, x, y)


def reference_run(data_dir, optimizer, rho=0.05, interval=1, looksam_alpha=0.0):
    """pretrain.py's loop for PRETRAIN rebuilt from its parts: init, batches, schedule, train_step."""
    vocab = -(-load_meta(data_dir)['vocab_size'] // 128) * 128
    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab))
    adamw = torch.optim.AdamW(model.param_groups(0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    sam = SAM(adamw, rho=rho, looksam=looksam_alpha > 0)
    tokens = open_tokens(data_dir, 'train')
    kinds = []
    for it in range(STEPS):
        for group in adamw.param_groups:
            group['lr'] = lr_at(it, LR, STEPS, WARMUP, 'cosine', min_lr_ratio=0.1)
        batches = [(*train_batch(tokens, BLOCK, BATCH, (it * ACCUM + m) * BATCH, 1337), None) for m in range(ACCUM)]
        use_sam = optimizer != 'adamw' and it % interval == 0
        kinds.append(optimizer if use_sam else 'adamw')
        look_back = (lambda: sam.add_kept_component(looksam_alpha)) if looksam_alpha and not use_sam else None
        train_step(model, adamw, batches, contextlib.nullcontext(), 1.0, sam if use_sam else None,
                   along_momentum=optimizer == 'msam', adjust_grad=look_back)
    return model.state_dict(), adamw.state_dict()['state'], kinds


@pytest.fixture(scope='module')
def runs(wiki, fork_script, tmp_path_factory):
    """runs(name): out_dir of an uninterrupted pretrain.py run of VARIANTS[name], made once."""
    made = {}

    def get(name):
        if name not in made:
            out = str(tmp_path_factory.mktemp(name))
            ok(fork_script('pretrain.py', f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', *PRETRAIN,
                           *VARIANTS[name]).wait())
            made[name] = out
        return made[name]
    return get


@pytest.mark.parametrize('name,optimizer,rho,interval,alpha', [
    ('sam_every_2nd', 'sam', 0.05, 2, 0.0), ('msam', 'msam', 0.3, 1, 0.0), ('msam_every_3rd', 'msam', 0.3, 3, 0.0),
    ('looksam_every_3rd', 'sam', 0.05, 3, 0.7)])
def test_variant_equals_the_reference_loop(wiki, runs, name, optimizer, rho, interval, alpha):
    out = runs(name)
    weights, adam_state, kinds = reference_run(wiki, optimizer, rho, interval, alpha)
    ckpt = checkpoint(out)
    assert_same_tensors(ckpt['model'], weights)
    assert_same_tensors(ckpt['optimizer']['state'], adam_state)
    steps = [r for r in read_log(out) if 'loss' in r]
    # the log shows which steps were SAM (a loss at the perturbed point), Momentum-SAM (||m||) or AdamW
    logged = ['sam' if 'sam_loss' in r else 'msam' if 'momentum_norm' in r else 'adamw' for r in steps]
    assert logged == kinds
    assert kinds == [optimizer if it % interval == 0 else 'adamw' for it in range(STEPS)]
    # the forward/backward tokens it took: a SAM step's batch twice, Momentum-SAM's once
    tokens_per_iter = ACCUM * BATCH * BLOCK
    final = [r for r in read_log(out) if 'val_loss' in r][-1]
    assert final['fwd_bwd_tokens'] == tokens_per_iter * (STEPS + kinds.count('sam'))
    assert checkpoint(out)['compute']['fwd_tokens'] == 5 * 2 * BATCH * BLOCK  # evaluations at 0, 3, 6, 9, 12
    assert final['train_flops'] > 0 and final['train_flops'] % final['fwd_bwd_tokens'] == 0


def test_sam_counts_twice_the_tokens_of_adamw(wiki, tmp_path, fork_script):
    logs = {}
    for optimizer in ('adamw', 'sam'):
        out = str(tmp_path / optimizer)
        ok(fork_script('pretrain.py', f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', *PRETRAIN,
                       f'--optimizer={optimizer}').wait())
        logs[optimizer] = [r for r in read_log(out) if 'val_loss' in r][-1]
    assert logs['sam']['fwd_bwd_tokens'] == 2 * logs['adamw']['fwd_bwd_tokens'] == 2 * STEPS * ACCUM * BATCH * BLOCK
    assert logs['sam']['train_flops'] == 2 * logs['adamw']['train_flops']


@pytest.mark.parametrize('name', ['sam_every_2nd', 'msam', 'looksam_every_3rd'])
def test_killed_variant_resumes_bit_for_bit(wiki, runs, fork_script, tmp_path, name):
    out = str(tmp_path / 'run')
    args = (f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', *PRETRAIN, *VARIANTS[name])
    kill_at(fork_script, tmp_path, 'iter:5', 'pretrain.py', *args)  # between the checkpoints of 3 and 6
    assert checkpoint(out)['iter_num'] == 3
    ok(fork_script('pretrain.py', *args, '--init_from=resume').wait())
    ours, theirs = checkpoint(out), checkpoint(runs(name))
    assert_same_tensors(ours['model'], theirs['model'])
    assert_same_tensors(ours['optimizer']['state'], theirs['optimizer']['state'])
    assert ours['compute'] == theirs['compute']
    assert [torch.equal(a, b) for a, b in zip(ours.get('looksam', []), theirs.get('looksam', []))] == \
        [True] * len(theirs.get('looksam', []))
    assert without_speed(read_log(out)) == without_speed(read_log(runs(name)))


def torchrun_pretrain(wiki, out, *args, env={}):
    """pretrain.py with PRETRAIN and args on 2 gloo processes of one thread each."""
    import subprocess
    import sys
    from test_reliability import REPO
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(REPO, 'pretrain.py'), f'--data_root={os.path.dirname(wiki)}',
                             f'--out_dir={out}', *PRETRAIN, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', **env}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_msam_matches_one_process(wiki, runs, tmp_path):
    # the perturbation comes from AdamW's moment, the same on both ranks: 2 processes x 1 micro-batch = 1 x 2
    out = str(tmp_path / 'ddp')
    torchrun_pretrain(wiki, out, *VARIANTS['msam'])
    ours, theirs = checkpoint(out), checkpoint(runs('msam'))
    for key in theirs['model']:
        torch.testing.assert_close(ours['model'][key], theirs['model'][key], rtol=1e-4, atol=1e-5)
    final = [r for r in read_log(out) if 'val_loss' in r][-1]
    assert final['fwd_bwd_tokens'] == STEPS * ACCUM * BATCH * BLOCK


def test_ddp_looksam_keeps_the_ranks_identical(wiki, runs, tmp_path):
    """With the paper's rank-local ascent each rank has its own ascent direction, hence its own g_v: averaged across
    ranks, the AdamW steps between stay the same on both. With a synchronised ascent the run is the one-process one."""
    from test_reliability import FAULTS, REPO
    marker = str(tmp_path / 'weights')
    for ascent, out in (('False', 'local'), ('True', 'synced')):
        torchrun_pretrain(wiki, str(tmp_path / out), *VARIANTS['looksam_every_3rd'], f'--sam_sync_ascent={ascent}',
                          env={'FLATMIN_TEST_HOOK': f'weights:11:{marker}_{out}',
                               'PYTHONPATH': os.pathsep.join([FAULTS, REPO])})
        rank0, rank1 = (torch.load(f'{marker}_{out}.rank{r}.pt') for r in (0, 1))
        assert_same_tensors(rank0, rank1)  # by iteration 11: SAM at 0, 3, 6, 9 and LookSAM steps between
    single, local = checkpoint(runs('looksam_every_3rd')), checkpoint(str(tmp_path / 'local'))
    assert max((local['model'][k] - v).abs().max() for k, v in single['model'].items()) > 1e-4  # m-sharpness differs
    synced = checkpoint(str(tmp_path / 'synced'))
    for key, value in single['model'].items():
        torch.testing.assert_close(synced['model'][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('args,message', [(['--sam_interval=0'], 'sam_interval must be an int >= 1'),
                                          (['--optimizer=msam', '--sam_adaptive=True'], 'sam_adaptive'),
                                          (['--optimizer=msam', '--looksam_alpha=0.5'], "needs optimizer='sam'"),
                                          (['--optimizer=lookahead'], 'optimizer')])
def test_bad_variant_settings_are_refused(run_script, wiki, tmp_path, args, message):
    out = tmp_path / 'out'
    result = run_script('pretrain.py', f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', *PRETRAIN, *args)
    assert result.returncode != 0 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()

