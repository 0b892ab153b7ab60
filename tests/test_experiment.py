"""experiment.py end to end: the smoke preset's report and figures, numbers traced back to the stage outputs,
skipping finished stages, redoing changed ones, a failed stage, and a killed runner that is rerun."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from analysis import matched_forgetting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, 'configs', 'experiments', 'smoke.py')


def experiment(out, data_root, *args, wait=True):
    argv = [sys.executable, os.path.join(REPO, 'experiment.py'), SMOKE, f'--out_dir={out}', f'--data_root={data_root}',
            *args]
    if not wait:
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


def numbers(out):
    """results.json without what legitimately changes between runs (timings, environment)."""
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    return {k: results[k] for k in ('bases', 'sft', 'quantization')}


def stage_processes(out):
    """pids of running processes whose command line names out (the stages of a runner writing there)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if out.encode() in f.read():
                    pids.append(int(pid))
        except OSError:  # exited meanwhile
            pass
    return pids


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp('smoke')
    out, data_root = str(root / 'exp'), str(root / 'data')
    result = experiment(out, data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data_root, result, numbers(out)  # the numbers as first written (later tests rewrite the report)


def test_report_and_figures_exist(smoke):
    out, _, result, _ = smoke
    assert '17/17 stages done' in result.stdout
    for name in ('frontiers.png', 'sharpness.png'):
        with open(os.path.join(out, name), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(os.path.join(out, 'report.md')) as f:
        report = f.read()
    assert '![learning-forgetting frontiers](frontiers.png)' in report
    assert '## Missing stages\n\n- none' in report
    assert 'python pretrain.py configs/cpu_small.py' in report  # the exact commands
    assert '(17 stages run)' in report  # the invocation's wall time
    assert 'AMD' in report or 'Intel' in report or 'cores' in report  # the hardware line


def test_the_server_compiles_each_base_model_once_for_its_fine_tuning(smoke):
    out = smoke[0]
    with open(os.path.join(out, 'stage_server.log')) as f:
        log = f.read()
    assert 'Traceback' not in log, log[-3000:]
    compiled = re.findall(r"^compiled (\S+)'s model in [\d.]+ s$", log, re.M)
    if (os.cpu_count() or 1) // 2 == 1:  # one thread per stage (the smoke preset runs 2 at a time)
        assert sorted(compiled) == [os.path.join(out, 'pretrain', f'{base}_s1337', 'ckpt.pt') for base in ('adamw', 'sam')]
    else:
        assert not compiled and 'threads per stage' in log


def test_numbers_come_from_the_stage_outputs(smoke):
    out, _, _, _ = smoke
    results = numbers(out)
    with open(os.path.join(out, 'report.md')) as f:
        report = f.read()
    # base loss and quantization forgetting: evaluate.py's output, formatted into the report
    evaluation = json.load(open(os.path.join(out, 'evaluate', 'sam_s1337', 'eval.json')))
    base_loss = evaluation[os.path.join(out, 'pretrain', 'sam_s1337', 'ckpt.pt')]['pretrain_val_loss']
    assert results['bases']['sam']['1337']['pt_val_loss'] == base_loss
    assert f'| sam | {base_loss:.4f} |' in report
    quantized = json.load(open(os.path.join(out, 'evaluate', 'sam_s1337_quantized', 'eval.json')))
    q_loss = quantized[os.path.join(out, 'quantize', 'sam_s1337_nf4', 'ckpt.pt')]['pretrain_val_loss']
    assert math.isclose(results['quantization']['nf4']['1337']['forgetting']['sam'], q_loss - base_loss)
    # SFT forgetting: recomputed here from finetune.py's result.json files with the paper's analysis
    sweeps, base_pt = {}, {}
    for base in ('adamw', 'sam'):
        for lr in ('0.001', '0.01'):
            r = json.load(open(os.path.join(out, 'finetune', f'{base}_s1337', f'starcoder_lr{lr}', 'result.json')))
            sweeps.setdefault(base, []).append((r['final']['ft_val_loss'], r['final']['pt_val_loss']))
            base_pt[base] = r['base']['pt_val_loss']
    expected = matched_forgetting(sweeps, base_pt)
    got = results['sft']['starcoder']['1337']
    assert math.isclose(got['threshold']['sam'], expected['threshold'])
    assert math.isclose(got['forgetting']['sam'], expected['forgetting']['sam'])
    assert math.isclose(got['baseline_forgetting']['sam'], expected['forgetting']['adamw'])
    assert f"| starcoder | {expected['forgetting']['adamw']:.4f} | {expected['forgetting']['sam']:.4f} |" in report


def test_rerun_skips_finished_and_redoes_changed_stages(smoke, tmp_path):
    out, data_root, _, before = smoke
    again = experiment(out, data_root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert '17 done, 0 to run' in again.stdout
    assert numbers(out) == before
    # a changed fine-tuning setting for one task redoes that task's runs only (2 bases x 2 learning rates)
    changed = experiment(out, data_root, "--task_learning_rates={'gsm8k': (1e-3, 3e-3)}", '--dry_run=True')
    assert changed.returncode == 0, changed.stderr
    assert '15 done, 2 to run' in changed.stdout and 'gsm8k_lr0.003' in changed.stdout


def test_tracking_and_benchmarks_leave_the_stage_keys_alone(smoke):
    """wandb_log / tensorboard go on the command line outside the stage keys (turning them on redoes nothing), and
    lm_eval_tasks only adds benchmark stages: the base, quantized and fine-tuned models of each base model."""
    out, data_root, _, _ = smoke
    tracked = experiment(out, data_root, '--wandb_log=True', '--tensorboard=True', '--dry_run=True')
    assert tracked.returncode == 0, tracked.stderr
    assert '17 done, 0 to run' in tracked.stdout
    changed = experiment(out, data_root, '--wandb_log=True', '--tensorboard=True', '--dry_run=True',
                         "--task_learning_rates={'gsm8k': (1e-3, 3e-3)}")
    lines = [line for line in changed.stdout.splitlines() if 'gsm8k_lr0.003' in line and 'finetune.py' in line]
    assert len(lines) == 2 and all('--wandb_log=True' in line and '--wandb_group=exp' in line and
                                   '/tensorboard' in line for line in lines)
    benchmarked = experiment(out, data_root, '--lm_eval_tasks=arc_easy', '--dry_run=True')
    assert benchmarked.returncode == 0, benchmarked.stderr
    assert '17 done, 12 to run' in benchmarked.stdout  # 2 bases x (base, quantized, 2 tasks x 2 learning rates)
    commands = [line for line in benchmarked.stdout.splitlines() if 'benchmark/' in line]
    assert all('--lm_eval_tasks=arc_easy' in line for line in commands)


def test_failed_stage_is_reported_and_the_rest_goes_on(smoke):
    out, data_root, _, reference = smoke
    bases = {'adamw': 'configs/cpu_small.py --n_layer=1 --n_embd=32', 'broken': 'configs/cpu_small.py --n_layer=0'}
    result = experiment(out, data_root, f'--bases={bases}')
    assert result.returncode == 1
    assert 'FAILED pretrain/broken_s1337' in result.stderr + result.stdout
    assert 'missing finetune/broken_s1337/gsm8k_lr0.001: not run: pretrain/broken_s1337 failed' in result.stderr
    with open(os.path.join(out, 'report.md')) as f:
        report = f.read()
    log = os.path.join(out, 'pretrain', 'broken_s1337', 'stage.log')
    assert f'`pretrain/broken_s1337`: failed, log `{log}`' in report
    with open(log) as f:
        assert 'n_layer' in f.read()  # pretrain.py's own one-line error is in the stage log
    assert numbers(out)['bases']['adamw'] == reference['bases']['adamw']  # the adamw stages were reused
    assert '9 done, 8 to run' in result.stdout  # the adamw stages were reused, the broken base's all tried


def test_killed_runner_reruns_to_the_same_numbers(smoke, tmp_path):
    _, data_root, _, reference = smoke
    out = str(tmp_path / 'exp')
    runner = experiment(out, data_root, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(out, 'pretrain', 'sam_s1337', 'log.jsonl')):
        time.sleep(0.2)  # killed while pretraining and fine-tuning stages run
    time.sleep(1.0)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    time.sleep(0.5)
    assert not stage_processes(out), "the runner's stages outlived it"
    assert not os.path.exists(os.path.join(out, 'report.md'))
    rerun = experiment(out, data_root)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert numbers(out) == reference


def test_bad_experiment_config_is_one_line(smoke, run_script):
    out, _, _, _ = smoke
    for args, phrase in [(['--baseline=sgd'], "baseline 'sgd' is not one of the bases"),
                         (['--learning_rate=1e-3'], "unknown config key 'learning_rate'"),
                         (['--seeds=(1, 1)'], 'seeds repeat'),
                         (["--task_learning_rates={'gsm8k': 1e-3}"], 'task_learning_rates must map tasks to tuples'),
                         (["--bases={1: 'x'}"], 'bases must map names to pretrain.py arguments'),
                         (["--finetune_args='unclosed"], 'finetune_args is not a command line (No closing quotation)'),
                         (['--finetune_config=configs/sft/{name}.py'], "finetune_config must be a config path")]:
        result = run_script('experiment.py', SMOKE, f'--out_dir={out}', *args)
        assert result.returncode == 2
        assert result.stderr.strip().count('\n') == 0 and phrase in result.stderr, result.stderr


def dry_run(preset, tmp_path, *args):
    result = subprocess.run([sys.executable, os.path.join(REPO, 'experiment.py'), preset, f'--out_dir={tmp_path}/x',
                             '--dry_run=True', *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_long_presets_stage_lists(tmp_path):
    # the default: 4 base models x 5 tasks x 8 learning rates, dense near the top
    default = subprocess.run([sys.executable, os.path.join(REPO, 'experiment.py'), f'--out_dir={tmp_path}/d',
                              '--dry_run=True'], cwd=REPO, capture_output=True, text=True, timeout=600).stdout
    assert default.count('finetune.py') == 4 * 5 * 8 and '--learning_rate=0.004 ' in default
    # cpu_seeds: the default's grid at three seeds
    seeds = '\n'.join(dry_run(os.path.join(REPO, 'configs', 'experiments', 'cpu_seeds.py'), tmp_path))
    assert seeds.count('finetune.py') == 3 * 4 * 5 * 8
    # cpu_regime: AdamW and SAM at four budgets x4 apart plus the repetition control, each its own pretraining
    regime = dry_run(os.path.join(REPO, 'configs', 'experiments', 'cpu_regime.py'), tmp_path)
    pretrains = [line for line in regime if 'pretrain.py' in line]
    assert len(pretrains) == 10 and sum('finetune.py' in line for line in regime) == 10 * 5 * 8
    steps = sorted(int(line.split('--max_iters=')[1].split()[0]) for line in pretrains)
    assert steps == [200, 200, 800, 800, 3200, 3200, 3200, 3200, 12800, 12800]
    assert all('--n_embd=32 --vocab_size=258' in line and 'wiki_en_bytes' in line for line in pretrains)
    assert sum('--max_train_tokens=1140000' in line for line in pretrains) == 2
    assert sum('--optimizer=sam --sam_rho=0.05' in line for line in pretrains) == 5
