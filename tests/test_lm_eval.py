"""Benchmarks through lm-evaluation-harness (evaluate.py --lm_eval_tasks) on local tasks written here, checked against
the same scores computed directly with model.py; and an exported directory used by lm-eval and transformers as is."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip('lm_eval')
transformers = pytest.importorskip('transformers')

from checkpoint import load_model  # noqa: E402
from data import load_meta, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
MC = [{'question': 'The capital of France is', 'choices': ['Paris', 'London', 'a banana'], 'answer': 0},
      {'question': 'Water is made of', 'choices': ['hydrogen and oxygen', 'gold', 'music'], 'answer': 0},
      {'question': 'The sun rises in the', 'choices': ['west', 'east', 'river'], 'answer': 1},
      {'question': 'A year has', 'choices': ['twelve months', 'three days', 'no time'], 'answer': 0},
      {'question': 'The river flows into the', 'choices': ['sea', 'sky', 'book'], 'answer': 0}]
TEXTS = ['The city was founded in the twelfth century.', 'It is the largest river in the country by volume.',
         'Music and art were important   to the people of the region.']
TASK_YAML = {
    'mc': """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    'text': """task: local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""}


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp('lm_eval_tasks')
    for name, rows in (('mc', MC), ('text', [{'text': t} for t in TEXTS])):
        with open(directory / f'{name}.jsonl', 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
        (directory / f'{name}.yaml').write_text(TASK_YAML[name].format(path=directory / f'{name}.jsonl'))
    return str(directory)


@torch.no_grad()
def continuation_logprob(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids[:, :-1])[0][0].double(), -1)
    targets = ids[0, len(context_ids):]
    return logprobs[len(context_ids) - 1:].gather(1, targets[:, None]).sum().item()


def direct_scores(model, enc):
    """The local tasks' metrics from model.py, as lm-eval defines them: a multiple-choice answer is ' ' + choice after
    the question (tokenized as one string, the continuation = the tokens after the question's); acc_norm divides
    each log-likelihood by the choice's length in characters; a rolling text is scored after <|endoftext|>."""
    acc, acc_norm = [], []
    for row in MC:
        context = enc.encode_ordinary(row['question'])
        lls = [continuation_logprob(model, context, enc.encode_ordinary(row['question'] + ' ' + c)[len(context):])
               for c in row['choices']]
        acc.append(int(np.argmax(lls)) == row['answer'])
        acc_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls, row['choices'])])) == row['answer'])
    ll = sum(continuation_logprob(model, [enc.eot_token], enc.encode_ordinary(t)) for t in TEXTS)
    words = sum(len(re.split(r'\s+', t)) for t in TEXTS)
    n_bytes = sum(len(t.encode('utf-8')) for t in TEXTS)
    return {'acc': np.mean(acc), 'acc_norm': np.mean(acc_norm), 'word_perplexity': math.exp(-ll / words),
            'byte_perplexity': math.exp(-ll / n_bytes), 'bits_per_byte': -ll / n_bytes / math.log(2)}


@pytest.fixture(scope='module')
def quantized(run_script, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('lm_eval_nf4')
    result = run_script('quantize.py', f'--init_from={tiny_ckpt}', '--method=nf4', f'--out_dir={out}',
                        '--quantize_head=True')
    assert result.returncode == 0, result.stderr
    return str(out / 'ckpt.pt')


def test_evaluate_scores_match_direct_computation(tiny_ckpt, quantized, wiki, task_dir, fork_script, tmp_path):
    out = tmp_path / 'eval.json'
    result = fork_script('evaluate.py', f'--checkpoints={tiny_ckpt},{quantized}', f'--out={out}', '--eval_iters=1',
                         '--lm_eval_tasks=local_mc,local_text', f'--lm_eval_include_path={task_dir}',
                         '--lm_eval_builtin_tasks=False', '--lm_eval_batch_size=4').wait()
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    enc = load_tokenizer(load_meta(wiki))
    directs = []
    for path in (tiny_ckpt, quantized):
        got, direct = evaluated[path]['lm_eval'], direct_scores(load_model(path)[0], enc)
        directs.append(direct)
        assert got['results']['local_mc']['acc,none'] == pytest.approx(direct['acc'], abs=1e-12)
        assert got['results']['local_mc']['acc_norm,none'] == pytest.approx(direct['acc_norm'], abs=1e-12)
        for metric in ('word_perplexity', 'byte_perplexity', 'bits_per_byte'):
            assert got['results']['local_text'][f'{metric},none'] == pytest.approx(direct[metric], rel=1e-4), metric
        assert got['scores'] == {'local_mc': direct['acc_norm']}  # the first of lm_eval_score_metrics it reports
        assert got['score'] == direct['acc_norm']
        assert 'pretrain_val_loss' in evaluated[path]  # next to the losses
    # the quantized model is scored as its own (dequantized) weights, not as the original
    assert directs[0]['bits_per_byte'] != pytest.approx(directs[1]['bits_per_byte'], rel=1e-4)


def test_unknown_lm_eval_task_is_one_line(run_script, tiny_ckpt, task_dir, tmp_path):
    result = run_script('evaluate.py', f'--checkpoints={tiny_ckpt}', f'--out={tmp_path}/eval.json',
                        '--lm_eval_tasks=local_mc,no_such_task', f'--lm_eval_include_path={task_dir}',
                        '--lm_eval_builtin_tasks=False')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: lm-eval knows no task 'no_such_task'")
    assert not os.path.exists(tmp_path / 'eval.json')


def test_export_generates_with_transformers_pipeline(hf_dir, tiny_ckpt, wiki):
    """pipeline('text-generation') on the exported directory, no edits: its greedy continuation (through the exported
    tokenizer, both ways) is model.py's greedy continuation of the same prompt."""
    generate = transformers.pipeline('text-generation', model=hf_dir, device='cpu')
    prompt = 'The history of the city'
    text = generate(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]['generated_text']
    enc = load_tokenizer(load_meta(wiki))
    model = load_model(tiny_ckpt)[0]
    ids = enc.encode_ordinary(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert text == enc.decode(ids[len(enc.encode_ordinary(prompt)):])


def test_export_loads_in_lm_eval(hf_dir, tiny_ckpt, wiki, task_dir):
    """lm-eval's own HFLM loading the exported directory by path gives the scores of our model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=hf_dir, device='cpu', batch_size=4, dtype='float32')
    out = lm_eval.simple_evaluate(model=lm, tasks=['local_text'], log_samples=False,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=task_dir, include_defaults=False))
    direct = direct_scores(load_model(tiny_ckpt)[0], load_tokenizer(load_meta(wiki)))
    assert out['results']['local_text']['bits_per_byte,none'] == pytest.approx(direct['bits_per_byte'], rel=1e-4)
