"""evaluate.py and the sharpness measures of sharpness.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint import load_model  # noqa: E402
from data import load_meta, load_tokenizer, open_tokens, val_batch  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sharpness import (batches_loss, hessian_trace, hvp, noise_proxy, rademacher_probes, sam_sharpness,  # noqa: E402
                       top_hessian_eigenvalue)

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_gpt(seed=0, init_std=0.5):
    """vocab 16, d 8, 1 layer, block 4: 728 parameters, few enough to form the Hessian."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=4, vocab_size=16, n_layer=1, n_head=2, n_embd=8, intermediate_size=8,
                         init_std=init_std))


def tiny_batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (3, 4), generator=g), torch.randint(0, 16, (3, 4), generator=g), None)
            for _ in range(n)]


def exact_hessian(model, batches):
    names, params = zip(*model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(v):
        pieces = torch.split(v, [p.numel() for p in params])
        weights = {n: t.view_as(p) for n, t, p in zip(names, pieces, params)}
        return sum(functional_call(model, weights, (x, y))[1] for x, y, _ in batches) / len(batches)
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    return (H + H.T) / 2


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, saved):
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), saved))


@pytest.fixture(scope='module')
def hessian_case():
    model, batches = tiny_gpt(), tiny_batches()
    H = exact_hessian(model, batches)
    return model, batches, H, torch.linalg.eigvalsh(H.double())


def test_hvp_and_top_eigenvalue_match_exact_hessian(hessian_case):
    model, batches, H, eigenvalues = hessian_case
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hvp(model, batches, v), H @ v, rtol=1e-4, atol=1e-4)
    # here the most negative eigenvalue is the largest in magnitude: power iteration would find it, Lanczos
    # finds the algebraically largest, which is what sharpness means
    assert -eigenvalues[0] > eigenvalues[-1] > 0
    saved = weights(model)
    result, cost = top_hessian_eigenvalue(model, batches, iters=40, tol=1e-5, seed=3)
    assert result['top_eigenvalue'] == pytest.approx(eigenvalues[-1].item(), rel=1e-5)
    assert abs(result['top_eigenvalue'] - eigenvalues[-1].item()) <= result['residual'] <= 1e-5 * eigenvalues[-1]
    assert result['min_eigenvalue'] == pytest.approx(eigenvalues[0].item(), rel=1e-3)
    assert result['converged'] and cost['hvps'] == result['iterations'] <= 40 and cost['batches'] == 2
    assert cost['seconds'] > 0
    loose, _ = top_hessian_eigenvalue(model, batches, iters=3, tol=1e-7, seed=3)
    assert loose['iterations'] == 3 and not loose['converged']
    assert_unchanged(model, saved)


def test_hutchinson_trace_matches_exact_hessian(hessian_case):
    model, batches, H, _ = hessian_case
    result, cost = hessian_trace(model, batches, samples=6, seed=5)
    probes = [v.float() for v in rademacher_probes(H.shape[0], 6, seed=5)]
    assert all(set(v.unique().tolist()) == {-1.0, 1.0} for v in probes)
    assert result['trace'] == pytest.approx(sum((v @ H @ v).item() for v in probes) / 6, rel=1e-4, abs=1e-3)
    assert cost['hvps'] == 6
    many, _ = hessian_trace(model, batches, samples=100, seed=6)  # unbiased: within a few standard errors
    assert abs(many['trace'] - H.trace().item()) < 4 * many['stderr']
    assert many['per_parameter'] == pytest.approx(many['trace'] / H.shape[0])


class Quadratic(nn.Module):
    """loss = mean((W - W0)^2), W0 of rms 3: noise of std s on W gives an expected loss of s^2."""
    def __init__(self):
        super().__init__()
        self.w0 = 3 * torch.randn(200_000, generator=torch.Generator().manual_seed(0))
        self.weight = nn.Parameter(self.w0.clone())

    def forward(self, x, y, loss_mask=None):
        return None, (self.weight - self.w0).pow(2).mean()


def test_noise_scaling():
    model, batches = Quadratic(), [(None, None, None)]
    rms = model.w0.pow(2).mean().sqrt().item()
    relative, cost = noise_proxy(model, batches, [0.0, 0.1, 0.2], seeds=2, scaling='relative')
    absolute, _ = noise_proxy(model, batches, [0.0, 0.1, 0.2], seeds=2, scaling='absolute')
    assert relative['loss'][0] == absolute['loss'][0] == relative['clean_loss'] == 0.0
    for i, sigma in enumerate([0.0, 0.1, 0.2]):
        assert relative['loss'][i] == pytest.approx((sigma * rms) ** 2, rel=0.02)  # std sigma * rms(W)
        assert absolute['loss'][i] == pytest.approx(sigma ** 2, rel=0.02)  # std sigma
    assert cost['forward_passes'] == 1 + 2 * 3
    assert torch.equal(model.weight.detach(), model.w0)
    with pytest.raises(ValueError):
        noise_proxy(model, batches, [0.1], scaling='layerwise')


@pytest.fixture(scope='module')
def trained():
    """The tiny GPT fitted to its batches: a point near a minimum."""
    model, batches = tiny_gpt(init_std=0.02), tiny_batches(seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        batches_loss(model, batches).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, batches


def test_noise_proxy_grows_with_sigma(trained):
    model, batches = trained
    saved = weights(model)
    with torch.no_grad():
        clean = batches_loss(model, batches).item()
    result, _ = noise_proxy(model, batches, [0.0, 0.05, 0.2, 0.5], seeds=3, seed=11)
    assert result['loss'][0] == result['clean_loss'] == clean and result['loss_std'][0] == 0.0
    assert 0 < result['loss_increase'][1] < result['loss_increase'][2] < result['loss_increase'][3]
    assert result['loss_increase'] == pytest.approx([loss - clean for loss in result['loss']])
    assert_unchanged(model, saved)


def test_sam_sharpness_matches_manual_computation(trained):
    model, batches = trained
    saved = weights(model)
    result, cost = sam_sharpness(model, batches, rho=0.05)
    # by hand, on a copy
    copy = tiny_gpt(init_std=0.02)
    copy.load_state_dict(model.state_dict())
    loss = batches_loss(copy, batches)
    grads = torch.autograd.grad(loss, list(copy.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(copy.parameters(), grads):
            p.add_(0.05 * g / norm)
        perturbed = batches_loss(copy, batches).item()
    assert result['loss'] == pytest.approx(loss.item(), rel=1e-5)
    assert result['grad_norm'] == pytest.approx(norm.item(), rel=1e-4)
    assert result['sharpness'] == pytest.approx(perturbed - loss.item(), rel=1e-3, abs=1e-6)
    assert result['sharpness'] > 0  # uphill near a minimum
    assert cost == {'seconds': cost['seconds'], 'forward_passes': 4, 'backward_passes': 2}
    assert_unchanged(model, saved)
    assert all(p.grad is None for p in model.parameters())


# evaluate.py end to end ---------------------------------------------------------------------------------------

EVAL_ARGS = ['--eval_iters=2', '--batch_size=4', '--val_tokens=1024', '--noise_sigmas=[0,0.1,0.5]', '--noise_seeds=2',
             '--sharpness_batches=1', '--hessian_iters=4', '--trace_samples=3', '--device=cpu']


@pytest.fixture(scope='module')
def quantized(run_script, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('nf4')
    assert run_script('quantize.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}').returncode == 0
    return str(out / 'ckpt.pt')


@pytest.fixture(scope='module')
def evaluated(tiny_ckpt, quantized, tmp_path_factory):
    """evaluate.py on the base and its nf4 quantization, in a fresh interpreter, with every measure."""
    out = tmp_path_factory.mktemp('eval') / 'eval.json'
    result = subprocess.run([sys.executable, os.path.join(REPO, 'evaluate.py'),
                             f'--checkpoints={tiny_ckpt},{quantized}', '--tasks=gsm8k',
                             '--sharpness=noise,hessian,trace,sam', f'--out={out}', *EVAL_ARGS],
                            capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        return json.load(f), result


def test_evaluate_reports_losses_and_sharpness(tiny_ckpt, quantized, wiki, evaluated):
    results, run = evaluated
    assert run.stderr == ''
    assert list(results) == [tiny_ckpt, quantized]
    meta = load_meta(wiki)
    tokens = open_tokens(wiki, 'val', meta)
    batches = [(*val_batch(tokens, 32, 4, i), None) for i in range(2)]  # block_size 32: the checkpoint's
    import tasks
    x, y, mask = tasks.task_tensors('gsm8k', 'val', load_tokenizer(meta), 32, max_tokens=1024, seed=1337)
    for path, r in results.items():
        model, _ = load_model(path)
        with torch.no_grad():
            pretrain = batches_loss(model, batches).item()
            per_token = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction='none')
        task = (per_token * mask.flatten()).sum().item() / mask.sum().item()
        assert r['pretrain_val_loss'] == pytest.approx(pretrain, rel=1e-5)
        assert r['pretrain_ppl'] == pytest.approx(math.exp(pretrain), rel=1e-5)
        assert r['tasks']['gsm8k'] == pytest.approx({'loss': task, 'ppl': math.exp(task), 'tokens': mask.sum().item()},
                                                    rel=1e-5)
        assert r['eval'] == {'data_dir': wiki, 'eval_iters': 2, 'batch_size': 4, 'block_size': 32, 'dtype': 'float32'}
        # the same numbers as the functions of sharpness.py give on the same batches
        s = r['sharpness']
        noise, _ = noise_proxy(model, batches, [0, 0.1, 0.5], seeds=2, seed=1337)
        assert s['noise']['loss'] == pytest.approx(noise['loss'], rel=1e-5) and s['noise']['scaling'] == 'absolute'
        assert s['noise']['loss'][0] == pytest.approx(r['pretrain_val_loss'], rel=1e-6)
        top, _ = top_hessian_eigenvalue(model, batches[:1], iters=4, tol=1e-3, seed=1337)
        assert s['hessian']['top_eigenvalue'] == pytest.approx(top['top_eigenvalue'], rel=1e-4)
        trace, _ = hessian_trace(model, batches[:1], samples=3, seed=1337)
        assert s['trace']['trace'] == pytest.approx(trace['trace'], rel=1e-4)
        assert s['sam']['sharpness'] == pytest.approx(sam_sharpness(model, batches[:1], 0.05)[0]['sharpness'], rel=1e-4)
        cost = r['cost']
        assert set(cost) == {'pretrain_val', 'task:gsm8k', 'noise', 'hessian', 'trace', 'sam'}
        assert all(c['seconds'] > 0 for c in cost.values())
        assert cost['noise']['forward_passes'] == 2 * (1 + 2 * 3)
        assert cost['hessian']['hvps'] == s['hessian']['iterations'] and cost['trace']['hvps'] == 3
    assert 'quantization' not in results[tiny_ckpt] and results[quantized]['quantization']['method'] == 'nf4'
    assert results[quantized]['pretrain_val_loss'] != results[tiny_ckpt]['pretrain_val_loss']
    assert 'gsm8k val loss' in run.stdout and 'top eigenvalue' in run.stdout


# bad input ----------------------------------------------------------------------------------------------------

def other_tokenizer(tmp_path, ckpt):
    data = torch.load(ckpt, weights_only=False)
    data['tokenizer'] = {**data['tokenizer'], 'hash': 'another'}
    torch.save(data, tmp_path / 'other.pt')
    return [f'--checkpoints={ckpt},{tmp_path / "other.pt"}']


def short_val_split(tmp_path, ckpt):
    data_dir = tmp_path / 'data'
    wiki = load_model(ckpt)[1]['config']
    shutil.copytree(os.path.join(wiki['data_root'], wiki['dataset']), data_dir)
    meta = json.loads((data_dir / 'meta.json').read_text())
    (data_dir / 'val.bin').write_bytes((data_dir / 'val.bin').read_bytes()[:20])  # 10 uint16 tokens
    (data_dir / 'meta.json').write_text(json.dumps({**meta, 'val_tokens': 10}))
    return [f'--checkpoints={ckpt}', f'--pretrain_data={data_dir}']


def no_val_examples(tmp_path, ckpt):
    (tmp_path / 'empty.jsonl').write_text('')
    return [f'--checkpoints={ckpt}', f'--tasks={tmp_path / "empty.jsonl"}']


BAD = {
    'other_tokenizer': (other_tokenizer, ['other.pt', 'another tokenizer']),
    'missing_checkpoint': (lambda tmp_path, ckpt: [f'--checkpoints={ckpt},{tmp_path / "nope.pt"}'],
                           ['checkpoint not found', 'nope.pt']),
    'no_checkpoints': (lambda tmp_path, ckpt: [], ['checkpoints']),
    'unknown_task': (lambda tmp_path, ckpt: [f'--checkpoints={ckpt}', '--tasks=gsm8k,poetry'],
                     ["unknown task 'poetry'"]),
    'unknown_measure': (lambda tmp_path, ckpt: [f'--checkpoints={ckpt}', '--sharpness=noise,fisher'],
                        ["unknown sharpness measure 'fisher'"]),
    'empty_pretrain_val': (short_val_split, ['val.bin', 'shorter than block_size+1']),
    'empty_task_val': (no_val_examples, ['empty.jsonl', 'holds 0 tokens']),
    'unknown_scaling': (lambda tmp_path, ckpt: [f'--checkpoints={ckpt}', '--noise_scaling=global'], ['noise_scaling']),
    'out_exists': (lambda tmp_path, ckpt: [f'--checkpoints={ckpt}', '--overwrite=False'],
                   ['eval.json exists', '--overwrite=True']),
}


def check_bad(run, tiny_ckpt, tmp_path, name):
    make_args, phrases = BAD[name]
    out = tmp_path / 'eval.json'
    out.write_text('{"an": "earlier result"}\n')
    # --overwrite=True: a failing start must leave the earlier result alone even so
    result = run('evaluate.py', f'--out={out}', '--overwrite=True', *EVAL_ARGS, *make_args(tmp_path, tiny_ckpt))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('evaluate.py: error: '), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert out.read_text() == '{"an": "earlier result"}\n' and os.listdir(tmp_path).count('eval.json') == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


@pytest.mark.parametrize('name', list(BAD))
def test_bad_input(run_script, tiny_ckpt, tmp_path, name):
    check_bad(run_script, tiny_ckpt, tmp_path, name)


def test_bad_input_fresh_interpreter(fresh_script, tiny_ckpt, tmp_path):
    check_bad(fresh_script, tiny_ckpt, tmp_path, 'other_tokenizer')
