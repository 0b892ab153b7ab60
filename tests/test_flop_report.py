"""The forgetting-per-FLOP comparison: the cpu_flop preset's stage list, and the report's FLOPs table and figure on
stage outputs whose numbers are known."""
import json
import os
import subprocess
import sys

import pytest

from figures import plot_flops
from per_flop import flops_comparison, flops_table, training_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(preset, out_dir):
    result = subprocess.run([sys.executable, os.path.join(REPO, 'experiment.py'), preset, '--dry_run=True',
                             f'--out_dir={out_dir}'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_cpu_flop_preset_stage_list(tmp_path):
    flop = dry_run('configs/experiments/cpu_flop.py', tmp_path)
    seeds = dry_run('configs/experiments/cpu_seeds.py', tmp_path)
    assert flop[0].startswith(f'experiment {tmp_path}: 1723 stages, 0 done, 1723 to run')
    commands = [line.split('] ', 1)[1] for line in flop[1:]]
    # every cpu_seeds stage is in it with the same command (so the same key: its runs are reused)
    assert set(line.split('] ', 1)[1] for line in seeds[1:]) <= set(commands)

    def only(prefix):
        found = [c for c in commands if prefix in c]
        assert found, prefix
        return found

    for seed in (1337, 1338, 1339):
        run = f'{tmp_path}/pretrain/{{}}_s{seed}'
        assert '--optimizer=sam --sam_rho=0.05 --sam_interval=2 --max_iters=1000' in only(run.format('sam_every2'))[0]
        assert '--sam_interval=4' in only(run.format('sam_every4'))[0]
        assert '--sam_start_fraction=0.9' in only(run.format('sam_final10'))[0]
        assert '--optimizer=msam' in only(run.format('msam'))[0]
        adamw_2x = only(run.format('adamw_2x'))[0]
        assert '--max_iters=2000' in adamw_2x and '--max_iters=1000' not in adamw_2x
    for row, args in (('replay', '--replay_fraction=0.25'), ('l2init', '--l2_init=0.01'), ('lora', '--lora_rank=8'),
                      ('lora_x10', '--lora_rank=8 --lora_alpha=160')):
        tuned = only(f'--out_dir={tmp_path}/finetune/adamw+{row}_s')
        assert len(tuned) == 3 * 5 * 8 and all(c.endswith(args) or args in c for c in tuned)
        assert all(f'--init_from={tmp_path}/pretrain/adamw_s' in c for c in tuned)  # the AdamW base, fine-tuned again


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def test_flops_table_and_figure_from_known_counts(tmp_path):
    config = {'bases': {'adamw': '', 'sam': ''}, 'baseline': 'adamw', 'seeds': (1, 2), 'tasks': ('gsm8k',),
              'quantize_methods': ('nf4',), 'finetune_mitigations': {'replay': ('adamw', '--replay_fraction=0.5')}}
    pretrain = {'adamw': 100.0, 'sam': 200.0}
    finetune = {'adamw': [10.0, 30.0], 'sam': [10.0, 30.0], 'adamw+replay': [20.0, 60.0]}  # two learning rates
    stages = {}
    for base, flops in pretrain.items():
        for seed in (1, 2):
            name = f'pretrain/{base}_s{seed}'
            stages[name] = {'name': name, 'kind': 'pretrain', 'dir': str(tmp_path / name)}
            write(os.path.join(stages[name]['dir'], 'log.jsonl'),
                  json.dumps({'iter': 0, 'val_loss': 5.0, 'train_flops': 0}) + '\n' +
                  json.dumps({'iter': 5, 'loss': 4.0}) + '\n' +
                  json.dumps({'iter': 10, 'val_loss': 4.0, 'train_flops': flops}) + '\n')
    for row, per_lr in finetune.items():
        for seed in (1, 2):
            for i, flops in enumerate(per_lr):
                name = f'finetune/{row}_s{seed}/gsm8k_lr{i}'
                product = str(tmp_path / name / 'result.json')
                stages[name] = {'name': name, 'kind': 'finetune', 'dir': str(tmp_path / name), 'product': product}
                write(product, json.dumps({'task': 'gsm8k', 'final': {'ft_val_loss': 1.0},
                                           'compute': {'train_flops': flops}}))
    interval = {'sam': {'sft': {'gsm8k': {'matched': [15.0, 5.0, 25.0], 'area': [12.0, 4.0, 20.0]},
                                'mean': {'matched': [15.0, 5.0, 25.0], 'area': [12.0, 4.0, 20.0]}},
                        'quantization': {'nf4': [40.0, -2.0, 60.0]}},
                'adamw+replay': {'sft': {'gsm8k': {'matched': [5.0, 1.0, 11.0], 'area': [3.0, -1.0, 6.0]},
                                         'mean': {'matched': [5.0, 1.0, 11.0], 'area': [3.0, -1.0, 6.0]}}}}
    comparison = flops_comparison({'comparisons': interval}, training_flops(str(tmp_path), stages, config), config)
    assert comparison['four_bit'] == 'nf4'
    sam, replay = comparison['rows']['sam'], comparison['rows']['adamw+replay']
    # (pretraining + mean fine-tuning run) / the baseline's, and its mean over tasks; 4-bit: pretraining only
    sam_ratio, replay_ratio = (200 + 20) / (100 + 20), (100 + 40) / (100 + 20)
    assert sam['relative_flops'] == {'gsm8k': pytest.approx(sam_ratio), 'mean': pytest.approx(sam_ratio), 'nf4': 2.0}
    assert replay['relative_flops'] == {'gsm8k': pytest.approx(replay_ratio), 'mean': pytest.approx(replay_ratio),
                                        'nf4': 1.0}
    # the area figure per task and over tasks, the matched one over tasks
    assert sam['percent_less'] == {'mean': [12.0, 4.0, 20.0], 'gsm8k': [12.0, 4.0, 20.0], 'nf4': [40.0, -2.0, 60.0]}
    assert sam['matched_mean'] == [15.0, 5.0, 25.0]
    assert replay['percent_less']['nf4'] == [0.0, 0.0, 0.0]  # it keeps the AdamW base
    assert replay['baseline'] == 'adamw'
    table = flops_table(comparison, config)
    assert table[0] == ("| row | baseline | training FLOPs / baseline's | tasks (area): % less "
                        "| tasks (matched): % less | gsm8k (area): % less | nf4: % less |")
    assert table[2] == ('| sam | adamw | 1.833 | 12.0 [4.0, 20.0] less | 15.0 [5.0, 25.0] less '
                        '| 12.0 [4.0, 20.0] less | 40.0 [-2.0, 60.0] n.d. |')
    assert table[3].startswith('| adamw+replay | adamw | 1.167 | 3.0 [-1.0, 6.0] n.d. | 5.0 [1.0, 11.0] less |')
    assert plot_flops(comparison, config, str(tmp_path / 'flops.png'))
    assert os.path.getsize(tmp_path / 'flops.png') > 1000
