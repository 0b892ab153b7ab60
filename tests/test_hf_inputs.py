"""Hugging Face models wherever a checkpoint is taken (finetune.py, quantize.py, evaluate.py: hf:NAME or a directory,
through hf.hf_as_checkpoint), checked against the same model given as our own checkpoint; no download."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip('transformers')

from checkpoint import load_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')


def test_quantize_and_evaluate_take_a_hf_directory(hf_dir, tiny_ckpt, wiki, run_script, tmp_path):
    for name, source in (('ours', tiny_ckpt), ('hf', hf_dir)):
        result = run_script('quantize.py', f'--init_from={source}', f'--out_dir={tmp_path / name}', '--method=nf4',
                            f'--pretrain_data={wiki}' if name == 'hf' else '--overwrite=False')
        assert result.returncode == 0, result.stderr
    ours, theirs = (load_checkpoint(str(tmp_path / name / 'ckpt.pt')) for name in ('ours', 'hf'))
    assert ours['model'].keys() == theirs['model'].keys()
    assert all(torch.equal(ours['model'][k], theirs['model'][k]) for k in ours['model'])
    assert theirs['tokenizer'] == ours['tokenizer'] and theirs['config']['dataset'] == 'wiki_en'
    assert theirs['quantization']['source'] == hf_dir

    out = tmp_path / 'eval.json'
    quantized_hf = str(tmp_path / 'hf' / 'ckpt.pt')
    result = run_script('evaluate.py', f'--checkpoints={tiny_ckpt},{hf_dir},{quantized_hf}', f'--pretrain_data={wiki}',
                        f'--out={out}', '--eval_iters=2', '--batch_size=4')
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(out.read_text())
    assert evaluated[hf_dir]['pretrain_val_loss'] == pytest.approx(evaluated[tiny_ckpt]['pretrain_val_loss'], rel=1e-6)
    assert evaluated[quantized_hf]['quantization']['method'] == 'nf4'


def test_finetune_takes_a_hf_directory(hf_dir, tiny_ckpt, wiki, fork_script, tmp_path):
    common = ['configs/sft/gsm8k.py', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1',
              '--max_tokens=512', '--val_tokens=256', '--eval_interval=2', '--eval_iters=1', '--device=cpu',
              '--dtype=float32']
    results = []
    for name, args in (('ours', [f'--init_from={tiny_ckpt}']),
                       ('hf', [f'--init_from={hf_dir}', f'--pretrain_data={wiki}'])):
        result = fork_script('finetune.py', *common, *args, f'--out_dir={tmp_path / name}').wait()
        assert result.returncode == 0, result.stderr[-2000:]
        results.append(json.loads((tmp_path / name / 'result.json').read_text()))
    ours, theirs = results
    assert theirs['init_from'] == hf_dir
    assert theirs['trajectory'] == ours['trajectory']  # the same weights, data and run: the same numbers
    assert theirs['final'] == ours['final']


def test_hf_input_needs_its_data(hf_dir, run_script, tmp_path):
    result = run_script('quantize.py', f'--init_from={hf_dir}', f'--out_dir={tmp_path / "q"}')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"quantize.py: error: init_from={hf_dir} is a Hugging Face checkpoint: pass --pretrain_data=<a dataset "
        f"prepared with its tokenizer> (OLMo-2: prepare.py --tokenizer=cl100k_base)"]
    assert not os.path.exists(tmp_path / 'q')


def test_hub_name_offline_is_one_line_in_finetune(wiki, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HOME': str(tmp_path / 'hf_home'),
           'HF_ENDPOINT': 'http://127.0.0.1:9'}  # nothing listens there: the Hub is unreachable
    env.pop('HF_HUB_OFFLINE', None)
    result = subprocess.run([sys.executable, 'finetune.py', 'configs/sft/gsm8k.py',
                             '--init_from=hf:allenai/OLMo-2-0425-1B',
                             '--hf_revision=stage1-step1907359-tokens4001B', f'--pretrain_data={wiki}',
                             f'--out_dir={tmp_path / "ft"}', '--device=cpu'],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'allenai/OLMo-2-0425-1B' in result.stderr and 'no internet' in result.stderr
    assert not os.path.exists(tmp_path / 'ft')
