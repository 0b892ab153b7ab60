"""Crash safety: runs SIGKILLed at exact points (between checkpoints, and while one is being written) resume to the
weights of a run never stopped, bit for bit; a DDP rank that dies ends the torchrun job at once; numerical guards.

Kill points come from tests/fault_injection (installed from outside the scripts): FLATMIN_TEST_HOOK=<event>:<n>:<marker>
makes the script write its pid to <marker> at that point and sleep until the test SIGKILLs it, so every kill lands
exactly where the test says.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
FAULTS = os.path.join(REPO, 'tests', 'fault_injection')
# 12 iterations of 2 micro-batches; an evaluation and a checkpoint every 3 (at 3, 6, 9 and the end)
PRETRAIN = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
            '--gradient_accumulation_steps=2', '--max_iters=12', '--warmup_iters=2', '--learning_rate=3e-3',
            '--eval_interval=3', '--eval_iters=2', '--log_interval=1', '--device=cpu', '--dtype=float32']
# 16 steps of 2 x 4 sequences of 32 tokens; an evaluation every 4 steps, a checkpoint at 4, 8, 12 and the end
FINETUNE = ['--task=gsm8k', '--batch_size=4', '--gradient_accumulation_steps=2', '--val_tokens=1024', '--eval_iters=2',
            '--eval_interval=4', '--log_interval=1', '--max_tokens=4096', '--learning_rate=1e-2', '--device=cpu',
            '--dtype=float32']

pytestmark = pytest.mark.usefixtures('one_thread')  # the in-process runs of the guard tests


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=False)


def temp_files(out):
    return sorted(f for f in os.listdir(out) if f.endswith('.tmp'))


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def without_speed(records):
    return [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'tflops', 'mfu')} for r in records]


def assert_same_tensors(a, b):
    """Every tensor of nested dicts a and b is equal, bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k])
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


def kill_at(fork_script, tmp_path, hook, script, *args):
    """Run script until kill point `hook` ('iter:N' or 'save:N', see tests/fault_injection), SIGKILL it there."""
    marker = tmp_path / 'paused'
    proc = fork_script(script, *args, env={'FLATMIN_TEST_HOOK': f'{hook}:{marker}'})
    deadline = time.monotonic() + 120  # a hang guard only
    while not marker.exists():
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:  # it ended without reaching the hook
            pytest.fail(f'{script} ended before {hook}: {proc.wait().stderr[-2000:]}')
        assert time.monotonic() < deadline, f'{script} never reached {hook}'
        time.sleep(0.02)
    assert int(marker.read_text()) == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait().returncode == -signal.SIGKILL
    marker.unlink()


@pytest.fixture(scope='module')
def data_root(wiki):
    return os.path.dirname(wiki)


@pytest.fixture(scope='module')
def reference(data_root, fork_script, tmp_path_factory):
    """reference(optimizer): out_dir of an uninterrupted PRETRAIN run, made once."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            out = str(tmp_path_factory.mktemp(f'reference_{optimizer}'))
            ok(fork_script('pretrain.py', f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN,
                           f'--optimizer={optimizer}').wait())
            runs[optimizer] = out
        return runs[optimizer]
    return get


# 1. kill and resume ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('optimizer', ['adamw', 'sam'])
def test_pretrain_killed_anywhere_resumes_bit_for_bit(fork_script, data_root, reference, tmp_path, optimizer):
    out = str(tmp_path / 'run')
    args = (f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN, f'--optimizer={optimizer}')
    resume = (*args, '--init_from=resume')

    kill_at(fork_script, tmp_path, 'iter:5', 'pretrain.py', *args)  # between checkpoints
    assert checkpoint(out)['iter_num'] == 3 and temp_files(out) == []

    ckpt_bytes = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    kill_at(fork_script, tmp_path, 'save:1', 'pretrain.py', *resume)  # while writing the checkpoint of iteration 6
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == ckpt_bytes  # the previous one, whole
    assert checkpoint(out)['iter_num'] == 3
    assert [f.startswith('.ckpt.pt.') for f in temp_files(out)] == [True]  # the half-written one, beside it

    # the resumed run starts from ckpt.pt (iteration 3), never from the stray temporary file (6), and removes it
    kill_at(fork_script, tmp_path, 'iter:4', 'pretrain.py', *resume)
    assert temp_files(out) == [] and checkpoint(out)['iter_num'] == 3

    kill_at(fork_script, tmp_path, 'save:3', 'pretrain.py', *resume)  # while writing the final checkpoint (12)
    assert checkpoint(out)['iter_num'] == 9

    ok(fork_script('pretrain.py', *resume).wait())
    ours, theirs = checkpoint(out), checkpoint(reference(optimizer))
    assert ours['iter_num'] == 12 and temp_files(out) == []
    assert_same_tensors(ours['model'], theirs['model'])
    assert_same_tensors(ours['optimizer']['state'], theirs['optimizer']['state'])
    # the log reads as if the run had never stopped: each iteration once, the same losses
    assert without_speed(read_log(out)) == without_speed(read_log(reference(optimizer)))


def test_finetune_killed_anywhere_resumes_bit_for_bit(fork_script, tiny_ckpt, tmp_path):
    ref = str(tmp_path / 'reference')
    ok(fork_script('finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={ref}', *FINETUNE).wait())
    out = str(tmp_path / 'run')
    resume = ('--init_from=resume', f'--out_dir={out}', *FINETUNE)

    kill_at(fork_script, tmp_path, 'iter:6', 'finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}', *FINETUNE)
    assert checkpoint(out)['iter_num'] == 4 and 'optimizer' in checkpoint(out)

    ckpt_bytes = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    kill_at(fork_script, tmp_path, 'save:1', 'finetune.py', *resume)  # writing the checkpoint of iteration 8
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == ckpt_bytes
    assert [f.startswith('.ckpt.pt.') for f in temp_files(out)] == [True]

    kill_at(fork_script, tmp_path, 'iter:5', 'finetune.py', *resume)  # resumed from 4, not from the temporary file
    assert temp_files(out) == []

    kill_at(fork_script, tmp_path, 'save:3', 'finetune.py', *resume)  # writing the final checkpoint (16) ...
    with open(os.path.join(out, 'result.json')) as f:
        assert json.load(f)['final'] is not None  # ... after result.json was final: the resume redoes the end
    assert checkpoint(out)['iter_num'] == 12

    ok(fork_script('finetune.py', *resume).wait())
    ours, theirs = checkpoint(out), checkpoint(ref)
    assert ours['iter_num'] == 16 and 'optimizer' not in ours and temp_files(out) == []
    assert_same_tensors(ours['model'], theirs['model'])
    assert ours['finetune'] == theirs['finetune'] and ours['finetune']['init_from'] == tiny_ckpt
    results = []
    for run in (out, ref):
        with open(os.path.join(run, 'result.json')) as f:
            results.append(json.load(f))
    assert results[0]['config'].pop('out_dir') == out and results[1]['config'].pop('out_dir') == ref
    assert results[0] == results[1]
    assert [p['iter'] for p in results[0]['trajectory']] == [0, 4, 8, 12, 16]
    assert without_speed(read_log(out)) == without_speed(read_log(ref))


def test_finished_finetune_resumes_to_nothing(fork_script, tiny_ckpt, tmp_path):
    # resuming a finished run (its checkpoint has no optimizer state) changes nothing
    out = str(tmp_path / 'run')
    args = (f'--out_dir={out}', *FINETUNE, '--max_tokens=1024')
    ok(fork_script('finetune.py', f'--init_from={tiny_ckpt}', *args).wait())
    before = {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)}
    assert 'already finished' in ok(fork_script('finetune.py', '--init_from=resume', *args).wait()).stdout
    assert {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)} == before


# 2. a DDP rank dies ----------------------------------------------------------------------------------------------

def test_ddp_rank_death_ends_the_job_then_resumes_on_one_process(fork_script, data_root, reference, tmp_path):
    out, marker = str(tmp_path / 'run'), tmp_path / 'paused'
    args = [f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN]
    # rank 1 stops at iteration 7 while rank 0 goes on into the step's gradient all-reduce and waits for it there
    env = {**ENV, 'FLATMIN_TEST_HOOK': f'iter:7:{marker}', 'FLATMIN_TEST_HOOK_RANK': '1',
           'PYTHONPATH': os.pathsep.join([FAULTS, REPO])}  # each worker installs the kill point at start-up
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    with subprocess.Popen([*launcher, os.path.join(REPO, 'pretrain.py'), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as job:
        try:
            deadline = time.monotonic() + 120
            while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), f'rank 1 never reached iteration 7: {job.communicate(timeout=60)[1][-3000:]}'
            os.kill(int(marker.read_text()), signal.SIGKILL)
            _, stderr = job.communicate(timeout=60)  # promptly: a hang fails here instead of waiting for gloo's timeout
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert re.search(r'rank\s*:\s*1 .*\n\s*exitcode\s*:\s*-9', stderr), stderr[-3000:]  # torchrun names the dead rank
    assert checkpoint(out)['iter_num'] == 6 and temp_files(out) == []

    # the global batch is 2 micro-batches in all: one process takes both and finishes the run
    ok(fork_script('pretrain.py', *args, '--init_from=resume').wait())
    ours, theirs = checkpoint(out), checkpoint(reference('adamw'))
    assert ours['iter_num'] == 12
    for k in theirs['model']:  # two processes sum gradients in another order: equal up to rounding
        torch.testing.assert_close(ours['model'][k], theirs['model'][k], atol=1e-5, rtol=0)
    assert [r['iter'] for r in read_log(out) if 'loss' in r] == list(range(1, 13))


# 3. numerical guards ---------------------------------------------------------------------------------------------

@pytest.fixture
def poison(monkeypatch):
    """poison(calls, loss=True): the forward/backward passes numbered `calls` (1-based; SAM makes two per step: the
    ascent, then the descent) leave non-finite gradients, and with loss=True a non-finite loss, as an overflow would."""
    def install(calls, loss=True):
        real, count = training.forward_backward, [0]

        def accumulate(model, *args):
            value = real(model, *args)
            count[0] += 1
            if count[0] in calls:
                for p in model.parameters():
                    p.grad.fill_(float('nan'))
                return value * float('nan') if loss else value
            return value
        monkeypatch.setattr(training, 'forward_backward', accumulate)
    return install


def bad_steps(out):
    return [r['iter'] for r in read_log(out) if r.get('bad_step')]


def test_non_finite_step_stops_and_keeps_the_last_checkpoint(run_script, poison, data_root, reference, tmp_path):
    out = str(tmp_path / 'run')
    poison({8})  # step 8 (0-based iteration 7), after the checkpoint at 6
    result = run_script('pretrain.py', f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith('pretrain.py: error: non-finite loss (nan) or gradient norm (nan) at iter 7'), error
    assert 'max_bad_steps=0' in error and 'last good checkpoint' in error and 'Traceback' not in result.stderr
    ckpt = checkpoint(out)
    assert ckpt['iter_num'] == 6 and temp_files(out) == []
    # the checkpoint at 6 is that of the unharmed run: nothing of the bad step reached it
    with open(os.path.join(reference('adamw'), 'log.jsonl')) as f:
        ref_val = [r['val_loss'] for r in map(json.loads, f) if r.get('iter') == 6 and 'val_loss' in r]
    assert [r['val_loss'] for r in read_log(out) if 'val_loss' in r][-1] == ref_val[0]
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())
    assert bad_steps(out) == [8]  # the bad step is in the log


@pytest.mark.parametrize('max_bad', [2, 1])
def test_max_bad_steps_skips_that_many(run_script, poison, data_root, tmp_path, max_bad):
    out = str(tmp_path / 'run')
    poison({4, 10})
    result = run_script('pretrain.py', f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN,
                        f'--max_bad_steps={max_bad}')
    assert bad_steps(out) == [4, 10]
    assert [r['bad_steps'] for r in read_log(out) if r.get('bad_step')] == [1, 2]
    if max_bad == 1:  # the second bad step is one too many
        assert result.returncode != 0
        assert 'at iter 9 (bad step 2, max_bad_steps=1)' in result.stderr.strip().splitlines()[-1]
        assert checkpoint(out)['iter_num'] == 9
        return
    ok(result)
    ckpt = checkpoint(out)
    assert ckpt['iter_num'] == 12 and ckpt['bad_steps'] == 2
    # the two bad steps never reached AdamW: 10 steps in its state, and finite weights
    assert all(s['step'].item() == 10 for s in ckpt['optimizer']['state'].values())
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())
    assert 'step skipped (bad step 1)' in result.stdout


def test_sam_logs_a_skipped_perturbation(run_script, poison, data_root, tmp_path):
    out = str(tmp_path / 'run')
    poison({7}, loss=False)  # the ascent pass of step 4: no perturbation, but a good descent step
    ok(run_script('pretrain.py', f'--data_root={data_root}', f'--out_dir={out}', *PRETRAIN, '--optimizer=sam',
                  '--log_interval=100'))
    train = [r for r in read_log(out) if 'loss' in r]
    # logged although log_interval skips the iteration: only the skip and the final iteration are
    assert [(r['iter'], r['sam_skipped']) for r in train] == [(4, True), (12, False)]
    assert train[0]['ascent_grad_norm'] != train[0]['ascent_grad_norm'] and 'bad_step' not in train[0]  # nan
    assert checkpoint(out)['iter_num'] == 12 and checkpoint(out)['bad_steps'] == 0


@pytest.mark.parametrize('max_bad', [0, 1])
def test_finetune_guard(run_script, poison, tiny_ckpt, tmp_path, max_bad):
    out = str(tmp_path / 'run')
    poison({6})  # step 6, after the checkpoint at 4
    result = run_script('finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}', *FINETUNE,
                        f'--max_bad_steps={max_bad}')
    assert bad_steps(out) == [6]
    if max_bad == 0:
        assert result.returncode != 0
        assert 'non-finite loss (nan) or gradient norm (nan) at iter 5' in result.stderr.strip().splitlines()[-1]
        assert checkpoint(out)['iter_num'] == 4
        with open(os.path.join(out, 'result.json')) as f:
            assert [p['iter'] for p in json.load(f)['trajectory']] == [0, 4]
        return
    ok(result)
    assert checkpoint(out)['iter_num'] == 16 and checkpoint(out)['bad_steps'] == 1


def test_resume_drops_log_lines_past_the_checkpoint_and_one_cut_short(tmp_path):
    # what a kill leaves in a log: records past the checkpoint, and a last line cut short mid-write
    from checkpoint import truncate_log
    log = tmp_path / 'log.jsonl'
    log.write_text('{"iter": 0, "val_loss": 6.2}\n{"iter": 1, "loss": 6.1}\n{"iter": 2, "loss": 6.0}\n{"iter": 3, "lo')
    truncate_log(str(log), 1)
    assert log.read_text() == '{"iter": 0, "val_loss": 6.2}\n{"iter": 1, "loss": 6.1}\n'
    truncate_log(str(log), -1)  # a new run
    assert log.read_text() == '' and os.listdir(tmp_path) == ['log.jsonl']
