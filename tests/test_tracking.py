"""Experiment tracking (tracking.py): log.jsonl mirrored to W&B (offline mode) and TensorBoard, read back with their own
formats: W&B's run file (its protobuf records) and TensorBoard's EventAccumulator. Resume continues the same series."""
import glob
import json
import math
import os
import struct
import sys

import pytest

wandb = pytest.importorskip('wandb')
pytest.importorskip('tensorboard')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402


def wandb_records(path):
    """The protobuf Records of an offline run's .wandb file: W&B writes them in LevelDB's log format (a 7-byte file
    header ':W&B' + magic + version, then 32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST).
    wandb 0.31 ships no Python reader for it (wandb-core, in Go, reads it for `wandb sync`)."""
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    pos, block, pending = 7, 32768, b''
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # padding at a block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b''
            yield record


def wandb_runs(wandb_dir):
    """[(run record, [history row dict])] of every offline run under wandb_dir, oldest first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*', 'run-*.wandb'))):
        run, rows = None, []
        for record in wandb_records(path):
            kind = record.WhichOneof('record_type')
            if kind == 'run':
                run = record.run
            elif kind == 'history':
                items = record.history.item
                row = {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in items}
                rows.append({**row, '_step': record.history.step.num})
        runs.append((run, rows))
    return runs


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(directory):
    acc = EventAccumulator(directory)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def expected_series(records):
    """{key: [(step, value)]} of the numbers in log.jsonl records, as the tracker sends them."""
    series = {}
    for r in records:
        for k, v in r.items():
            if k != 'iter' and isinstance(v, (int, float)):
                series.setdefault(k, []).append((r['iter'], float(v)))
    return series


def wandb_series(rows):
    series = {}
    for row in rows:
        for k, v in row.items():
            if not k.startswith('_'):
                series.setdefault(k, []).append((row['_step'], v))
    return series


def assert_same_series(got, want, rel=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key  # same steps, none twice
        for (_, a), (_, b) in zip(got[key], want[key]):
            assert a == pytest.approx(b, rel=rel) or (math.isnan(a) and math.isnan(b)), key


def pretrain_args(wiki, out, tb):
    return [f'--data_root={os.path.dirname(wiki)}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=6', '--warmup_iters=1',
            '--learning_rate=1e-2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1', '--device=cpu',
            '--dtype=float32', '--optimizer=sam', '--wandb_log=True', '--wandb_group=exp1', f'--tensorboard_dir={tb}']


def test_pretrain_mirrors_log_to_wandb_and_tensorboard_across_resume(wiki, fork_script, tmp_path):
    out, tb, wandb_dir = tmp_path / 'pt', str(tmp_path / 'tb'), str(tmp_path / 'wandb')
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': wandb_dir, 'WANDB_SILENT': 'true'}
    first = fork_script('pretrain.py', *pretrain_args(wiki, out, tb), '--stop_at_iter=3', env=env).wait()
    assert first.returncode == 0, first.stderr[-2000:]
    # a killed run's records after its checkpoint (iter 3): log.jsonl drops them on resume, and so must TensorBoard
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(tb) as w:
        w.add_scalar('loss', 99.0, 4)
    second = fork_script('pretrain.py', *pretrain_args(wiki, out, tb), '--init_from=resume', env=env).wait()
    assert second.returncode == 0, second.stderr[-2000:]

    records = read_jsonl(out / 'log.jsonl')
    want = expected_series(records)
    for key in ('loss', 'lr', 'grad_norm', 'sam_loss', 'ascent_grad_norm', 'tokens_per_s', 'val_loss'):
        assert key in want, key
    assert [s for s, _ in want['loss']] == [1, 2, 3, 4, 5, 6]
    assert_same_series(tensorboard_scalars(tb), want)

    runs = wandb_runs(wandb_dir)
    assert len(runs) == 2  # one offline directory per process; `wandb sync` uploads both into the one run
    (run1, rows1), (run2, rows2) = runs
    assert run1.run_id == run2.run_id == json.load(open(out / 'wandb_run.json'))['id']
    assert run1.run_group == 'exp1' and run1.job_type == 'pretrain' and run1.display_name == 'pt'
    assert max(r['_step'] for r in rows1) == 3 and min(r['_step'] for r in rows2) == 4  # continues, no step twice
    steps = [r['_step'] for r in rows1 + rows2]
    assert steps == sorted(set(steps))  # one history row per step: W&B merges the records of a step (tokens twice)
    merged = {k: sorted(dict(v).items()) for k, v in want.items()}
    assert_same_series(wandb_series(rows1 + rows2), merged)


def test_finetune_logs_learning_and_forgetting_on_one_axis(tiny_ckpt, fork_script, tmp_path):
    out, tb = tmp_path / 'ft', str(tmp_path / 'tb')
    result = fork_script('finetune.py', 'configs/sft/gsm8k.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}',
                         '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_tokens=1024',
                         '--val_tokens=256',
                         '--eval_interval=4', '--eval_iters=1', '--log_interval=1', '--device=cpu', '--dtype=float32',
                         f'--tensorboard_dir={tb}').wait()
    assert result.returncode == 0, result.stderr[-2000:]
    want = expected_series(read_jsonl(out / 'log.jsonl'))
    got = tensorboard_scalars(tb)
    assert_same_series(got, want)
    steps = [s for s, _ in got['loss']]
    assert [s for s, _ in got['ft_val_loss']] == [s for s, _ in got['pt_val_loss']] == [0, 4, 8]
    assert steps == list(range(1, 9))  # training loss on the same iteration axis as learning and forgetting


def test_missing_package_is_one_line(run_script, tiny_ckpt, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # importlib finds no wandb
    result = run_script('finetune.py', 'configs/sft/gsm8k.py', f'--init_from={tiny_ckpt}', f'--out_dir={tmp_path}/ft',
                        '--wandb_log=True')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "finetune.py: error: wandb_log=True needs the optional package wandb: pip install wandb "
        "(or pip install -r requirements-hf.txt)"]
    assert not os.path.exists(tmp_path / 'ft')


def test_under_ddp_only_rank_0_logs(wiki, tmp_path):
    import subprocess
    out, tb = tmp_path / 'ddp', str(tmp_path / 'tb')
    args = [a for a in pretrain_args(wiki, out, tb) if not a.startswith(('--wandb', '--gradient'))]
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'pretrain.py', *args, '--gradient_accumulation_steps=2', '--max_iters=2'],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(os.listdir(tb)) == 1  # one event file: rank 0's
    assert_same_series(tensorboard_scalars(tb), expected_series(read_jsonl(out / 'log.jsonl')))
