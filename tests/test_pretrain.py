"""pretrain.py end to end, run as a user runs it (a subprocess, or torchrun for DDP) on a tiny model.

Runs that several tests compare against (12 iterations straight through) are made once per module and cached.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, 'pretrain.py')
# a 2-core CPU runs these tiny models far faster on one thread (two threads per process oversubscribe it)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
TIMEOUT = 120  # a hang fails the test instead of blocking CI
MAX_ITERS, STOP, BATCH, BLOCK = 12, 5, 4, 32
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', f'--block_size={BLOCK}', f'--batch_size={BATCH}', '--device=cpu',
        '--dtype=float32', '--compile=False', '--eval_iters=4', '--eval_interval=6', '--log_interval=1',
        '--learning_rate=3e-3', '--warmup_iters=2', f'--max_iters={MAX_ITERS}', '--gradient_accumulation_steps=1']
TRAIN_KEYS = {'iter', 'tokens', 'lr', 'loss', 'grad_norm', 'tokens_per_s', 'tflops'}  # + mfu on a known GPU
SAM_KEYS = {'sam_loss', 'ascent_grad_norm', 'sam_skipped'}


def pretrain(data_root, out_dir, *args, launcher=(sys.executable,)):
    """pretrain.py with the tiny settings, then args (later arguments win)."""
    return run([*launcher, PRETRAIN, f'--data_root={data_root}', f'--out_dir={out_dir}', *TINY, *map(str, args)])


def run(argv):
    # a session of its own, so that a hang kills torchrun's workers too (they would hold the pipes open)
    with subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            pytest.fail(f'{" ".join(argv)} did not finish in {TIMEOUT} s')
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def torchrun(data_root, out_dir, *args):
    return pretrain(data_root, out_dir, *args,
                    launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))


def ok(result):
    # tqdm redraws its bar with \r: keep what a terminal would show, so the error itself is in the message
    assert result.returncode == 0, '\n'.join(line.rsplit('\r', 1)[-1] for line in result.stderr.split('\n'))[-5000:]
    return result


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_lines(log):
    return [r for r in log if 'loss' in r]


def eval_lines(log):
    return [r for r in log if 'val_loss' in r]


def without_speed(records):
    return [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'tflops', 'mfu')} for r in records]


def load(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)


def assert_weights(a, b, exact=True, atol=1e-5):
    a, b = load(a)['model'], load(b)['model']
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def max_weight_diff(a, b):
    a, b = load(a)['model'], load(b)['model']
    return max((a[k] - b[k]).abs().max().item() for k in a)


def file_bytes(out_dir):
    return {f: open(os.path.join(out_dir, f), 'rb').read() for f in sorted(os.listdir(out_dir))}


@pytest.fixture(scope='module')
def data_root(wiki):
    return os.path.dirname(wiki)


def cached_runs(tmp_path_factory, label, make):
    """get(optimizer, accum) -> out_dir of make(out_dir, optimizer, accum), run once per module (copy it to modify)."""
    cache = {}

    def get(optimizer, accum):
        if (optimizer, accum) not in cache:
            out = str(tmp_path_factory.mktemp(f'{label}_{optimizer}_g{accum}'))
            ok(make(out, f'--optimizer={optimizer}', f'--gradient_accumulation_steps={accum}'))
            cache[optimizer, accum] = out
        return cache[optimizer, accum]
    return get


@pytest.fixture(scope='module')
def straight(data_root, tmp_path_factory):
    """An uninterrupted MAX_ITERS run."""
    return cached_runs(tmp_path_factory, 'straight', lambda out, *args: pretrain(data_root, out, *args))


@pytest.fixture(scope='module')
def stopped(data_root, tmp_path_factory):
    """The same run stopped (with its checkpoint) at iteration STOP."""
    return cached_runs(tmp_path_factory, 'stopped',
                       lambda out, *args: pretrain(data_root, out, *args, f'--stop_at_iter={STOP}'))


@pytest.fixture(scope='module')
def fast_pretrain(data_root, fork_script):
    """Like pretrain(), but forked from a Python that has already imported torch (conftest.fork_script): a failing start
    takes well under a second (test_bad_input_fresh_interpreter checks one case in a real start)."""
    def fork_run(out_dir, *args):
        return fork_script('pretrain.py', f'--data_root={data_root}', f'--out_dir={out_dir}', *TINY, *args).wait(TIMEOUT)
    return fork_run


# 1. a run trains, checkpoints and logs ---------------------------------------------------------------------------

@pytest.mark.parametrize('optimizer,accum', [('adamw', 2), ('sam', 2)])
def test_run_writes_checkpoint_and_log(straight, optimizer, accum):
    out = straight(optimizer, accum)
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # no temporary files left behind
    log = read_log(out)
    evals = eval_lines(log)
    assert [r['iter'] for r in evals] == [0, 6, 12]
    assert evals[-1]['val_loss'] < evals[0]['val_loss']
    assert all(r['tokens'] == r['iter'] * BATCH * accum * BLOCK for r in log)
    train = train_lines(log)
    assert [r['iter'] for r in train] == list(range(1, MAX_ITERS + 1))
    for r in train:
        assert set(r) == TRAIN_KEYS | (SAM_KEYS if optimizer == 'sam' else set())
        assert all(math.isfinite(r[k]) for k in ('lr', 'loss', 'grad_norm', 'tokens_per_s', 'tflops'))
        assert r['lr'] > 0 and r['grad_norm'] > 0 and r['tokens_per_s'] > 0 and r['tflops'] > 0
    assert train[1]['lr'] > train[0]['lr'] and train[-1]['lr'] < train[2]['lr']  # warmup, then decay
    if optimizer == 'sam':  # the perturbed point w + e is uphill
        assert not any(r['sam_skipped'] for r in train)
        assert sum(r['sam_loss'] for r in train) > sum(r['loss'] for r in train)
    ckpt = load(out)
    assert ckpt['iter_num'] == MAX_ITERS and ckpt['tokens'] == MAX_ITERS * BATCH * accum * BLOCK
    assert ckpt['config']['optimizer'] == optimizer and ckpt['model_args']['n_layer'] == 2


# 2. exact resume ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('optimizer,accum', [('adamw', 2), ('sam', 2)])
def test_resume_is_exact(data_root, straight, stopped, tmp_path, optimizer, accum):
    reference = straight(optimizer, accum)
    shutil.copytree(stopped(optimizer, accum), tmp_path, dirs_exist_ok=True)
    assert load(tmp_path)['iter_num'] == STOP and max(r['iter'] for r in read_log(tmp_path)) == STOP
    ok(pretrain(data_root, tmp_path, f'--optimizer={optimizer}', f'--gradient_accumulation_steps={accum}',
                '--init_from=resume'))
    assert load(tmp_path)['iter_num'] == MAX_ITERS
    assert_weights(tmp_path, reference, exact=True)
    ours, theirs = load(tmp_path)['optimizer']['state'], load(reference)['optimizer']['state']
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in ('step', 'exp_avg', 'exp_avg_sq'))
    log, ref_log = read_log(tmp_path), read_log(reference)
    assert len({json.dumps(r, sort_keys=True) for r in log}) == len(log)
    assert len({(r['iter'], 'val_loss' in r) for r in log}) == len(log)  # no iteration logged twice
    assert without_speed(train_lines(log)) == without_speed(train_lines(ref_log))
    # the stop added one evaluation (with its checkpoint) at STOP; the resumed run did not repeat it
    assert [r for r in eval_lines(log) if r['iter'] != STOP] == eval_lines(ref_log)
    assert [r['iter'] for r in eval_lines(log)] == [0, STOP, 6, 12]


# 3. mid-training from another run's checkpoint ------------------------------------------------------------------

def test_mid_training(data_root, straight, tmp_path):
    source = straight('adamw', 2)
    src = load(source)
    args = (f'--init_from={os.path.join(source, "ckpt.pt")}', '--optimizer=sam', '--lr_schedule=wsd',
            '--warmup_iters=0', '--anneal_fraction=0.25', '--max_iters=8', '--sam_start_fraction=0.5',
            '--weight_decay=0.05')
    fresh, kept = str(tmp_path / 'fresh'), str(tmp_path / 'kept')
    ok(pretrain(data_root, fresh, *args, '--stop_at_iter=1'))
    ok(pretrain(data_root, kept, *args, '--stop_at_iter=1', '--keep_optimizer_state=True'))
    for out in (fresh, kept):
        first = read_log(out)[0]  # a new log, starting with the source's weights evaluated
        assert first['iter'] == 0 and first['val_loss'] == pytest.approx(eval_lines(read_log(source))[-1]['val_loss'],
                                                                           abs=1e-6)
        assert [g['weight_decay'] for g in load(out)['optimizer']['param_groups']] == [0.05, 0.0]
        assert train_lines(read_log(out))[0]['lr'] == 3e-3  # no warmup
    # both took the same first step from the same weights; the kept state continued the source's AdamW moments
    f, k, s = load(fresh)['optimizer']['state'], load(kept)['optimizer']['state'], src['optimizer']['state']
    assert s.keys() == f.keys() == k.keys()
    for i in s:
        assert f[i]['step'].item() == 1 and k[i]['step'].item() == s[i]['step'].item() + 1 == MAX_ITERS + 1
        torch.testing.assert_close(k[i]['exp_avg'], 0.9 * s[i]['exp_avg'] + f[i]['exp_avg'], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(k[i]['exp_avg_sq'], 0.95 * s[i]['exp_avg_sq'] + f[i]['exp_avg_sq'],
                                   atol=1e-10, rtol=1e-5)
        assert not torch.allclose(k[i]['exp_avg'], f[i]['exp_avg'])
    # continue to the end: SAM only in the second half of the schedule (steps 4..7, logged as iterations 5..8)
    ok(pretrain(data_root, kept, *args, '--init_from=resume'))
    train = train_lines(read_log(kept))
    assert [r['iter'] for r in train] == list(range(1, 9))
    assert [('sam_loss' in r) for r in train] == [False] * 4 + [True] * 4
    assert [r['lr'] for r in train[:7]] == [3e-3] * 7 and train[7]['lr'] < 3e-3  # wsd: anneal the last 2 steps
    assert load(kept)['iter_num'] == 8


# 4. config files and overrides ---------------------------------------------------------------------------------

def test_config_file_and_overrides(data_root, tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text("n_layer = 2\nn_embd = 32\nn_head = 2\nblock_size = 32\nbatch_size = 4\nmax_iters = 2\n"
                      "gradient_accumulation_steps = 1\nwarmup_iters = 0\neval_iters = 2\nlearning_rate = 1e-2\n"
                      "lr_schedule = 'constant'\ndevice = 'cpu'\ndtype = 'float32'\n")
    out = str(tmp_path / 'a')
    # files and overrides apply left to right: the file beats the override before it, the one after it wins
    ok(run([sys.executable, PRETRAIN, '--max_iters=5', str(config), f'--data_root={data_root}', f'--out_dir={out}',
            '--learning_rate=2e-3']))
    cfg = load(out)['config']
    assert cfg['max_iters'] == 2 and cfg['learning_rate'] == 2e-3 and cfg['n_layer'] == 2
    assert load(out)['iter_num'] == 2 and train_lines(read_log(out))[0]['lr'] == 2e-3

    derived = tmp_path / 'derived.py'
    derived.write_text("from configs.adamw_20m import *\n\nn_layer = 2\nn_embd = 32\nn_head = 2\nblock_size = 32\n"
                       "batch_size = 4\ngradient_accumulation_steps = 1\nmax_iters = 1\nwarmup_iters = 0\n"
                       "eval_iters = 2\n")
    out = str(tmp_path / 'b')
    ok(run([sys.executable, PRETRAIN, str(derived), f'--data_root={data_root}', f'--out_dir={out}', '--dataset=wiki_en',
            '--compile=False', '--device=cpu', '--dtype=float32']))
    cfg = load(out)['config']
    assert cfg['eval_interval'] == 2000 and cfg['learning_rate'] == 1e-3  # from configs/adamw_20m.py
    assert cfg['n_layer'] == 2 and cfg['max_iters'] == 1  # the file's own settings beat the imported ones
    assert cfg['dataset'] == 'wiki_en' and cfg['compile'] is False and cfg['out_dir'] == out  # the command line's


# 5. bad input: one line on stderr, a non-zero exit, nothing already written destroyed -------------------------

def _bad_cases():
    def data_copy(tmp_path, wiki, damage):
        copy = tmp_path / 'data'
        shutil.copytree(wiki, copy / 'wiki_en')
        damage(str(copy / 'wiki_en' / 'train.bin'))
        return [f'--data_root={copy}', '--init_from=resume']

    def config_file(text):
        def make(tmp_path, wiki):
            (tmp_path / 'cfg.py').write_text(text)
            return [str(tmp_path / 'cfg.py')]
        return make

    def truncate_checkpoint(tmp_path, wiki):
        path = tmp_path / 'out' / 'ckpt.pt'
        os.truncate(path, os.path.getsize(path) // 2)
        return ['--init_from=resume']

    def mid_training(tmp_path, wiki):
        shutil.copy(tmp_path / 'out' / 'ckpt.pt', tmp_path / 'source.pt')
        return [f'--init_from={tmp_path / "source.pt"}']

    fixed = lambda *args: lambda tmp_path, wiki: list(args)  # noqa: E731
    return [
        ('unknown_key', fixed('--n_layers=2'), ["unknown config key 'n_layers'"]),
        ('wrong_type_int', fixed('--max_iters=abc'), ['max_iters must be an int >= 1, got str', "'abc'"]),
        ('wrong_type_float', fixed('--learning_rate="x"'), ['learning_rate must be a number > 0, got str']),
        ('not_key_value', fixed('--overwrite'), ["'--overwrite'", '--key=value']),
        ('negative_rho', fixed('--sam_rho=-0.1'), ['sam_rho']),
        ('anneal_zero', fixed('--lr_schedule=wsd', '--anneal_fraction=0'), ['anneal_fraction']),
        ('anneal_above_one', fixed('--anneal_fraction=1.5'), ['anneal_fraction']),
        ('warmup_past_end', fixed('--warmup_iters=20'), ['warmup_iters (20)', 'max_iters (12)']),
        ('unknown_optimizer', fixed('--optimizer=lion'), ['optimizer', "'lion'"]),
        ('unknown_schedule', fixed('--lr_schedule=linear'), ['lr_schedule', "'linear'"]),
        ('missing_data', lambda tmp_path, wiki: [f'--data_root={tmp_path / "nodata"}', '--init_from=resume'],
         ['missing', 'python prepare.py --dataset=wiki_en --source=wiki_en --data_root=']),
        ('empty_train_bin', lambda tmp_path, wiki: data_copy(tmp_path, wiki, lambda p: os.truncate(p, 0)),
         ['train.bin', 'empty']),
        ('truncated_train_bin', lambda tmp_path, wiki: data_copy(tmp_path, wiki,
                                                                 lambda p: os.truncate(p, os.path.getsize(p) - 2)),
         ['train.bin', 'truncated']),
        ('truncated_checkpoint', truncate_checkpoint, ['ckpt.pt', 'unreadable']),
        ('checkpoint_not_found', lambda tmp_path, wiki: [f'--init_from={tmp_path / "nothere.pt"}', '--overwrite=True'],
         ['checkpoint not found', 'nothere.pt']),
        ('scratch_over_checkpoint', fixed(), ['ckpt.pt exists', '--overwrite=True']),
        ('mid_training_over_checkpoint', mid_training, ['ckpt.pt exists', '--overwrite=True']),
        ('resume_other_shape', fixed('--init_from=resume', '--n_layer=3'), ['n_layer=3', '2']),
        ('resume_other_param_groups', fixed('--init_from=resume', '--decay_embeddings=False'), ['decay_embeddings']),
        ('missing_config_file', lambda tmp_path, wiki: [str(tmp_path / 'nope.py')],
         ['config file not found', 'nope.py']),
        ('config_syntax_error', config_file('n_layer = = 2\n'), ['cfg.py', 'SyntaxError']),
        ('config_unknown_key', config_file('n_layer = 2\nn_layers = 3\n'), ["unknown config key 'n_layers'", 'cfg.py']),
    ]


def check_bad_input(run, wiki, straight, tmp_path, make_args, phrases):
    out = tmp_path / 'out'
    shutil.copytree(straight('adamw', 2), out)  # a finished run that must survive
    args = make_args(tmp_path, wiki)
    before = file_bytes(out)
    result = run(out, *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('pretrain.py: error: '), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert file_bytes(out) == before  # nothing rewritten, no temporary files left


BAD_CASES = {name: (make_args, phrases) for name, make_args, phrases in _bad_cases()}


@pytest.mark.parametrize('name', list(BAD_CASES))
def test_bad_input(fast_pretrain, wiki, straight, tmp_path, name):
    check_bad_input(fast_pretrain, wiki, straight, tmp_path, *BAD_CASES[name])


def test_bad_input_fresh_interpreter(data_root, wiki, straight, tmp_path):
    # the case that gets furthest (data and checkpoint loaded) in a plain `python pretrain.py`: nothing that only a
    # fresh interpreter prints (import-time warnings, shutdown noise) joins the error line
    run = lambda out, *args: pretrain(data_root, out, *args)  # noqa: E731
    check_bad_input(run, wiki, straight, tmp_path, *BAD_CASES['resume_other_shape'])


# 6. DDP on CPU (gloo) -----------------------------------------------------------------------------------------

def test_ddp_adamw_matches_single_process_and_resumes_on_one(data_root, straight, stopped, tmp_path):
    # two processes, one micro-batch each = one process with two micro-batches: the same global batch
    ok(torchrun(data_root, tmp_path, '--gradient_accumulation_steps=2', '--optimizer=adamw', f'--stop_at_iter={STOP}'))
    single = stopped('adamw', 2)
    assert load(tmp_path)['iter_num'] == STOP
    assert_weights(tmp_path, single, exact=False)
    log = read_log(tmp_path)
    assert [r['iter'] for r in train_lines(log)] == list(range(1, STOP + 1))
    assert [r['tokens'] for r in log] == [r['tokens'] for r in read_log(single)]
    # the 2-process checkpoint continues on one process at the exact data position
    ok(pretrain(data_root, tmp_path, '--gradient_accumulation_steps=2', '--init_from=resume'))
    reference = straight('adamw', 2)
    assert_weights(tmp_path, reference, exact=False)
    log = read_log(tmp_path)
    assert [r['iter'] for r in train_lines(log)] == list(range(1, MAX_ITERS + 1))
    assert [r['tokens'] for r in train_lines(log)] == [r['tokens'] for r in train_lines(read_log(reference))]
    # a resumed run sees the batches of the uninterrupted one: its losses match (rank 0 logged only its half before)
    resumed, ref = train_lines(log)[STOP:], train_lines(read_log(reference))[STOP:]
    assert [r['loss'] for r in resumed] == pytest.approx([r['loss'] for r in ref], abs=1e-5)


def test_ddp_sam(data_root, straight, tmp_path):
    single = straight('sam', 2)
    local, synced = str(tmp_path / 'local'), str(tmp_path / 'synced')
    ok(torchrun(data_root, local, '--gradient_accumulation_steps=2', '--optimizer=sam'))
    assert load(local)['iter_num'] == MAX_ITERS and all('sam_loss' in r for r in train_lines(read_log(local)))
    # the paper's m-sharpness: each rank ascends along its own half-batch gradient, so the run differs
    assert max_weight_diff(local, single) > 1e-4
    ok(torchrun(data_root, synced, '--gradient_accumulation_steps=2', '--optimizer=sam', '--sam_sync_ascent=True'))
    assert_weights(synced, single, exact=False)
