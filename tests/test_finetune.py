"""finetune.py end to end on a tiny base model: learning and forgetting are recorded, from the base model's own
losses on; the fine-tuned checkpoint loads; DDP sees the same data; bad input stops with one line, destroying nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model
from data import load_tokenizer, open_tokens, val_batch
from tasks import is_val, task_tensors
from training import autocast_context, estimate_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, 'finetune.py')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # two cores: one thread per process runs tiny models fastest
TIMEOUT = 180
BLOCK, EVAL_ITERS, VAL_TOKENS = 32, 4, 2048
# 32 steps of 2 x 4 sequences of 32 tokens, evaluated every 8
TINY = ['--batch_size=4', '--gradient_accumulation_steps=2', f'--val_tokens={VAL_TOKENS}', f'--eval_iters={EVAL_ITERS}',
        '--eval_interval=8', '--log_interval=4', '--max_tokens=8192', '--device=cpu', '--dtype=float32']


def run(argv):
    result = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    # tqdm redraws with \r: keep what a terminal would show, so the error itself is in the message
    assert result.returncode == 0, '\n'.join(line.rsplit('\r', 1)[-1] for line in result.stderr.split('\n'))[-5000:]
    return result


def finetune(base, out_dir, *args, launcher=(sys.executable,)):
    return run([*launcher, FINETUNE, f'--init_from={base}', f'--out_dir={out_dir}', *TINY, *map(str, args)])


def result_of(out_dir):
    with open(os.path.join(out_dir, 'result.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def base(wiki, tmp_path_factory):
    """A 2-layer model (d 32, context 32) pretrained 60 steps on `wiki`: a base that knows some English."""
    out = tmp_path_factory.mktemp('sft_base')
    run([sys.executable, os.path.join(REPO, 'pretrain.py'), f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}',
         '--n_layer=2', '--n_head=2', '--n_embd=32', f'--block_size={BLOCK}', '--batch_size=8',
         '--gradient_accumulation_steps=1', '--max_iters=60', '--warmup_iters=5', '--learning_rate=1e-2',
         '--eval_interval=60', '--eval_iters=2', '--log_interval=60', '--device=cpu', '--dtype=float32'])
    return str(out / 'ckpt.pt')


@pytest.fixture(scope='module')
def gsm(base, tmp_path_factory):
    """gsm8k at a high learning rate."""
    out = str(tmp_path_factory.mktemp('sft_gsm'))
    finetune(base, out, '--task=gsm8k', '--learning_rate=3e-2')
    return out


# 1. learning and forgetting ---------------------------------------------------------------------------------

def test_gsm8k_learns_and_forgets(gsm, base):
    assert sorted(os.listdir(gsm)) == ['ckpt.pt', 'log.jsonl', 'result.json']  # no temporary files left
    result = result_of(gsm)
    assert {k: result[k] for k in ('task', 'source', 'init_from', 'learning_rate', 'max_tokens', 'tokens_per_iter',
                                   'max_iters')} == {'task': 'gsm8k', 'source': 'offline', 'init_from': base,
                                                     'learning_rate': 3e-2, 'max_tokens': 8192, 'tokens_per_iter': 256,
                                                     'max_iters': 32}
    trajectory = result['trajectory']
    assert [p['iter'] for p in trajectory] == [0, 8, 16, 24, 32]
    assert all(p['tokens'] == p['iter'] * 256 for p in trajectory)
    assert trajectory[0]['lr'] == 0 and trajectory[1]['lr'] > trajectory[-1]['lr'] > 0  # warmup 3 steps, then cosine
    base_losses = {k: trajectory[0][k] for k in ('ft_val_loss', 'pt_val_loss')}
    assert result['base'] == base_losses and result['final'] == {k: trajectory[-1][k] for k in base_losses}
    assert result['final']['ft_val_loss'] < base_losses['ft_val_loss'] - 0.5  # learning
    assert result['final']['pt_val_loss'] > base_losses['pt_val_loss'] + 0.1  # forgetting
    assert result['config']['learning_rate'] == 3e-2 and result['config']['eval_iters'] == EVAL_ITERS
    with open(os.path.join(gsm, 'log.jsonl')) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if 'loss' in r]
    assert [r['iter'] for r in steps] == list(range(4, 33, 4)) and all(r['tokens_per_s'] > 0 for r in steps)
    assert [r['pt_val_loss'] for r in log if 'pt_val_loss' in r] == [p['pt_val_loss'] for p in trajectory]


def test_losses_match_an_independent_evaluation(gsm, base, wiki):
    """iter 0 is the base model itself, on the same fixed batches; the final losses are those of the saved ckpt.pt."""
    pt_tokens, enc = open_tokens(wiki, 'val'), load_tokenizer(wiki)
    x, y, mask = task_tensors('gsm8k', 'val', enc, BLOCK, VAL_TOKENS)
    autocast = autocast_context('cpu', 'float32')

    def losses(path):
        model, ckpt = load_model(path)
        pt = estimate_loss(model, lambda i: (*val_batch(pt_tokens, BLOCK, 4, i), None), EVAL_ITERS, autocast)
        with torch.no_grad():  # the task loss by hand: the mean over all trained tokens of the validation split
            per_token = torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y, reduction='none')
        assert len(x) > 40
        ft = per_token[mask].mean().item()
        return {'ft_val_loss': ft, 'pt_val_loss': pt}, ckpt

    result = result_of(gsm)
    base_losses, _ = losses(base)
    final_losses, ckpt = losses(os.path.join(gsm, 'ckpt.pt'))
    assert base_losses == pytest.approx(result['base'], abs=1e-5)
    assert final_losses == pytest.approx(result['final'], abs=1e-5)
    # the fine-tuned checkpoint is one of ours: pretraining data, tokenizer and shape as the tools look them up
    assert os.path.join(ckpt['config']['data_root'], ckpt['config']['dataset']) == wiki
    assert ckpt['tokenizer'] == torch.load(base, weights_only=False)['tokenizer'] and ckpt['iter_num'] == 32
    assert ckpt['finetune'] == {'task': 'gsm8k', 'source': 'offline', 'init_from': base, 'result': result['final']}


def test_starcoder_at_a_longer_context(base, tmp_path):
    # RoPE is recomputed for any length: a context past the base model's 32 is allowed (and said)
    out = str(tmp_path / 'code')
    stdout = finetune(base, out, '--task=starcoder', '--block_size=48', '--max_tokens=6144', '--val_tokens=1536',
                      '--learning_rate=3e-3').stdout
    assert "longer than the base model's context (32)" in stdout
    result = result_of(out)
    assert result['max_iters'] == 16 and result['tokens_per_iter'] == 384
    assert result['final']['ft_val_loss'] < result['base']['ft_val_loss'] - 0.3
    assert load_model(os.path.join(out, 'ckpt.pt'))[1]['model_args']['block_size'] == 48


def test_ddp_sees_the_same_data(gsm, base, tmp_path):
    # two processes with one micro-batch each = one process with two: the same samples, the same trajectory
    out = str(tmp_path / 'ddp')
    finetune(base, out, '--task=gsm8k', '--learning_rate=3e-2', '--max_tokens=2048', '--eval_interval=4',
             launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    single = str(tmp_path / 'single')
    finetune(base, single, '--task=gsm8k', '--learning_rate=3e-2', '--max_tokens=2048', '--eval_interval=4')
    ddp, one = result_of(out)['trajectory'], result_of(single)['trajectory']
    assert [p['iter'] for p in ddp] == [p['iter'] for p in one] == [0, 4, 8]
    for a, b in zip(ddp, one):
        assert a['lr'] == b['lr']
        assert (a['ft_val_loss'], a['pt_val_loss']) == pytest.approx((b['ft_val_loss'], b['pt_val_loss']), abs=1e-4)
    assert one[0] == result_of(gsm)['trajectory'][0]  # the same base model measured the same way


def test_a_sweep_sharing_a_cache_dir(gsm, base, tmp_path):
    """--cache_dir: the first run of a sweep fills it (task data, the base model's evaluation), the next ones read it,
    and every result.json is what a run without it writes, bit for bit."""
    cache = str(tmp_path / 'cache')
    numbers = lambda out: {k: result_of(out)[k] for k in ('base', 'trajectory', 'final')}  # noqa: E731
    finetune(base, str(tmp_path / 'first'), '--task=gsm8k', '--learning_rate=3e-2', f'--cache_dir={cache}')
    assert numbers(str(tmp_path / 'first')) == numbers(gsm)
    assert len(os.listdir(os.path.join(cache, 'tasks'))) == 2 and len(os.listdir(os.path.join(cache, 'base_eval'))) == 1
    second = finetune(base, str(tmp_path / 'second'), '--task=gsm8k', '--learning_rate=1e-2', f'--cache_dir={cache}')
    assert "pretraining val loss" in second.stdout and "(the base model's, from " + cache in second.stdout
    finetune(base, str(tmp_path / 'uncached'), '--task=gsm8k', '--learning_rate=1e-2')
    assert numbers(str(tmp_path / 'second')) == numbers(str(tmp_path / 'uncached'))


# 2. bad input: one line on stderr, a non-zero exit, nothing already written destroyed ----------------------

def _bad_cases():
    def jsonl(name, rows):
        def make(tmp_path, wiki, out):
            path = tmp_path / name
            path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
            return [f'--task={path}']
        return make

    def truncated(tmp_path, wiki, out):
        shutil.copy(os.path.join(out, 'ckpt.pt'), tmp_path / 'cut.pt')
        os.truncate(tmp_path / 'cut.pt', os.path.getsize(tmp_path / 'cut.pt') // 2)
        return [f'--init_from={tmp_path / "cut.pt"}']

    def other_tokenizer(tmp_path, wiki, out):
        copy = tmp_path / 'other'
        shutil.copytree(wiki, copy)
        meta = json.loads((copy / 'meta.json').read_text())
        meta['tokenizer']['hash'] = '0123456789abcdef'  # as if prepared with another BPE
        (copy / 'meta.json').write_text(json.dumps(meta))
        return [f'--pretrain_data={copy}']

    fixed = lambda *args: lambda tmp_path, wiki, out: list(args)  # noqa: E731
    return {
        'no_init_from': (fixed('--init_from='), ["init_from must be the base checkpoint's path, or 'resume', got ''"]),
        'resume_other_learning_rate': (fixed('--init_from=resume'), ['resume: learning_rate=0.0001', '0.03']),
        'missing_checkpoint': (lambda tmp_path, wiki, out: [f'--init_from={tmp_path / "nope.pt"}'],
                               ['checkpoint not found', 'nope.pt']),
        'truncated_checkpoint': (truncated, ['cut.pt', 'unreadable']),
        'own_checkpoint': (lambda tmp_path, wiki, out: [f'--init_from={os.path.join(out, "ckpt.pt")}'], ['itself']),
        'unknown_task': (fixed('--task=gsm9k'), ["unknown task 'gsm9k'"]),
        'no_stand_in': (fixed('--task=metamath'), ['metamath', 'no offline stand-in']),
        'unknown_source': (fixed('--source=auto'), ['source', "'auto'"]),
        'jsonl_fields': (jsonl('qa.jsonl', [{'question': 'q', 'answer': 'a'}]), ['qa.jsonl:1', '"messages"']),
        'empty_val': (jsonl('trainonly.jsonl', TRAIN_ONLY), ['val split of trainonly.jsonl', '0 tokens']),
        'val_tokens_below_a_batch': (fixed('--val_tokens=64'), ['val_tokens (64)', 'one batch']),
        'other_tokenizer': (other_tokenizer, ['tokenized differently', 'other']),
        'missing_pretrain_data': (lambda tmp_path, wiki, out: [f'--pretrain_data={tmp_path / "none"}'],
                                  ['missing', 'none']),
        'unknown_key': (fixed('--lr=1e-3'), ["unknown config key 'lr'"]),
    }


TRAIN_ONLY = [r for r in ({'text': f'Line {i} of a file. ' * 4} for i in range(200)) if not is_val(r)]  # no val line
BAD_CASES = _bad_cases()


def file_bytes(out_dir):
    return {f: open(os.path.join(out_dir, f), 'rb').read() for f in sorted(os.listdir(out_dir))}


@pytest.mark.parametrize('name', list(BAD_CASES))
def test_bad_input(run_script, gsm, base, wiki, tmp_path, name):
    make_args, phrases = BAD_CASES[name]
    out = str(tmp_path / 'out')
    shutil.copytree(gsm, out)  # a finished run that must survive, even with --overwrite=True
    before = file_bytes(out)
    result = run_script('finetune.py', f'--init_from={base}', f'--out_dir={out}', *TINY, '--overwrite=True',
                        *make_args(tmp_path, wiki, out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith('finetune.py: error: '), result.stderr
    assert all(phrase in lines[0] for phrase in phrases), lines[0]
    assert file_bytes(out) == before


def test_existing_result_needs_overwrite(run_script, gsm, base, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(gsm, out)
    os.remove(os.path.join(out, 'ckpt.pt'))  # result.json alone is enough to refuse
    before = file_bytes(out)
    result = run_script('finetune.py', f'--init_from={base}', f'--out_dir={out}', *TINY)
    assert result.returncode != 0 and 'result.json exists' in result.stderr and '--overwrite=True' in result.stderr
    assert file_bytes(out) == before
