"""tasks.py: the offline stand-ins, the splits, the chat format's loss mask, packing, and user JSONL files."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import tiktoken
import torch

import tasks
from data import EOT, GPT2_PAT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = ('gsm8k', 'stackmathqa', 'tulu', 'starcoder', 'musicpile', 'french')
CHAT = ('gsm8k', 'stackmathqa', 'tulu')


@pytest.fixture(scope='module')
def enc():
    """One token per byte: token ids are the text's bytes, so expected ids and masks can be written by hand."""
    return tiktoken.Encoding('bytes', pat_str=GPT2_PAT, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={EOT: 256})


def first(task, split, n, seed=1337):
    return list(itertools.islice(tasks.examples(task, split, seed), n))


def key(example):
    return example['text'] if 'text' in example else example['messages'][0]['content']


def fails(capsys, fn, *phrases):
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ': error: ' in lines[0], lines
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# 1. the offline tasks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('task', OFFLINE)
def test_offline_task_splits_are_disjoint_and_fixed(task):
    n = 20 if task == 'starcoder' else 200  # whole standard-library files are big
    train, val = first(task, 'train', n), first(task, 'val', n // 4)
    assert len(train) == n and len(val) == n // 4
    for example in train + val:
        if task in CHAT:
            roles = [m['role'] for m in example['messages']]
            assert roles == ['user', 'assistant'] and all(m['content'] for m in example['messages'])
        else:
            assert set(example) == {'text'} and example['text'].strip()
    assert not {key(e) for e in train} & {key(e) for e in val}  # disjoint, even where the generator repeats itself
    assert all(tasks.is_val(e) for e in val) and not any(tasks.is_val(e) for e in train)
    assert first(task, 'train', n) == train  # the same data every time
    other_train = first(task, 'train', n // 4, seed=7)
    assert other_train != train[:n // 4]  # the seed picks the training examples or their order ...
    assert first(task, 'val', n // 4, seed=7) == val  # ... but never the validation split


def test_offline_contents():
    gsm = first('gsm8k', 'train', 1)[0]['messages']
    assert gsm[1]['content'].rstrip().split('\n')[-1].startswith('#### ')  # GSM8K-style reasoning, then the answer
    tune = first('musicpile', 'train', 1)[0]['text']
    assert tune.startswith('X:') and '\nK:' in tune and tune.count('\nX:') == 0  # one ABC tune per example
    code = first('starcoder', 'train', 5)
    assert any('def ' in e['text'] or 'import ' in e['text'] for e in code)
    assert all('site-packages' not in p and os.sep + 'test' + os.sep not in p for p in tasks.stdlib_files())
    assert ' est ' in ' '.join(e['text'] for e in first('french', 'train', 20))


def test_unknown_task_and_no_offline_stand_in(capsys):
    fails(capsys, lambda: tasks.examples('gsm9k', 'train'), "unknown task 'gsm9k'", 'gsm8k', '.jsonl')
    fails(capsys, lambda: next(tasks.examples('metamath', 'train')), 'metamath', 'no offline stand-in', 'hub')
    fails(capsys, lambda: tasks.examples('gsm8k', 'train', source='auto'), 'source', "'auto'")
    fails(capsys, lambda: tasks.examples('gsm8k', 'test'), 'split', "'test'")


def test_hub_unreachable_is_one_line():
    # a fresh interpreter, so that HF_HUB_OFFLINE=1 (read when huggingface_hub is imported) fails at once
    code = ("import tiktoken, tasks; enc = tiktoken.Encoding('b', pat_str='.', mergeable_ranks={bytes([b]): b for b in "
            "range(256)}, special_tokens={'<|endoftext|>': 256}); tasks.task_tensors('stackmathqa', 'val', enc, 8, 64, "
            "source='hub')")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'})
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert 'hub could not be reached for math-ai/StackMathQA' in lines[0]


# 2. format and loss mask -----------------------------------------------------------------------------------------

def test_chat_mask_by_hand(enc):
    example = {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                            {'role': 'assistant', 'content': 'Yo'}, {'role': 'user', 'content': '2+2?'},
                            {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'bye'}]}
    ids, mask = tasks.encode_example(enc, example)
    prompt1, prompt2 = '<|user|>\nBe brief.\n\nHi\n<|assistant|>\n', '<|user|>\n2+2?\n<|assistant|>\n'
    expected_ids = [*prompt1.encode(), *b'Yo', 256, *prompt2.encode(), *b'4', 256]  # the trailing user turn: dropped
    expected_mask = [False] * len(prompt1) + [True, True, True] + [False] * len(prompt2) + [True, True]
    assert ids == expected_ids and mask == expected_mask


def test_raw_text_fully_trained(enc):
    ids, mask = tasks.encode_example(enc, {'text': 'def f():\n    return 1\n'})
    assert ids == [*b'def f():\n    return 1\n', 256] and mask == [True] * len(ids)  # the text and its <|endoftext|>


@pytest.mark.parametrize('task', ['gsm8k', 'musicpile'])
def test_task_tensors_pack_and_mask(enc, task):
    block, max_tokens = 64, 64 * 40 + 10
    x, y, mask = tasks.task_tensors(task, 'train', enc, block, max_tokens)
    assert x.shape == y.shape == mask.shape == (40, block)
    assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.bool
    assert (x[:, 1:] == y[:, :-1]).all() and (x[1:, 0] == y[:-1, -1]).all()  # one stream, chunks sharing a token
    # rebuild the stream from the examples: the trained targets are exactly the replies (chat) or everything (raw)
    stream, trained = [], []
    for example in tasks.examples(task, 'train'):
        if task == 'gsm8k':
            prompt = f"<|user|>\n{example['messages'][0]['content']}\n<|assistant|>\n".encode()
            reply = [*example['messages'][1]['content'].encode(), 256]
            stream += [*prompt, *reply]
            trained += [False] * len(prompt) + [True] * len(reply)
        else:
            stream += [*example['text'].encode(), 256]
            trained += [True] * (len(stream) - len(trained))
        if len(stream) > 40 * block:
            break
    assert x.flatten().tolist() == stream[:40 * block]
    assert mask.flatten().tolist() == [trained[i + 1 + j] for i in range(0, 40 * block, block) for j in range(block)]
    if task == 'gsm8k':
        starts = [i for i in range(len(stream) - 8) if stream[i:i + 8] == list(b'<|user|>')]
        assert len(starts) >= 4 and not any(trained[i] for i in starts)  # an example's first token is never a target


def test_too_little_data_fails(enc, capsys):
    fails(capsys, lambda: tasks.task_tensors('gsm8k', 'train', enc, 64, 10), 'max_tokens (10)', 'block_size (64)')


# 3. user JSONL files -------------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
    return str(path)


def test_user_jsonl(enc, tmp_path):
    rows = []
    for i in range(300):
        if i % 2:
            rows.append({'messages': [{'role': 'user', 'content': f'What is {i} + 1?'},
                                      {'role': 'assistant', 'content': f'{i + 1}'}]})
        else:
            rows.append({'text': f'Document number {i}.'})
    path = write_jsonl(tmp_path / 'mine.jsonl', rows)
    train, val = list(tasks.examples(path, 'train')), list(tasks.examples(path, 'val'))
    assert len(train) + len(val) == 300 and 10 <= len(val) <= 60
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, rows))  # a partition of the file
    x, y, mask = tasks.task_tensors(path, 'val', enc, 16, 10_000)  # more than the split holds: all of it
    ids, trained = [], []
    for example in val:
        example_ids, example_mask = tasks.encode_example(enc, example)
        ids, trained = ids + example_ids, trained + example_mask
    n = (len(ids) - 1) // 16
    assert x.shape == (n, 16) and x.flatten().tolist() == ids[:n * 16]
    assert mask.flatten().tolist() == [trained[i * 16 + j + 1] for i in range(n) for j in range(16)]
    assert 0 < int(mask.sum()) < mask.numel()  # chat prompts untrained, the rest trained


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / 'bom.jsonl'
    path.write_text(json.dumps({'text': 'first'}) + '\n' + json.dumps({'text': 'second'}) + '\n', encoding='utf-8-sig')
    assert list(tasks.jsonl_examples(str(path))) == [{'text': 'first'}, {'text': 'second'}]


@pytest.mark.parametrize('row,phrases', [
    ({'prompt': 'x', 'completion': 'y'}, ['mine.jsonl:2', 'expected', '"messages"', '"text"']),
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, ['mine.jsonl:2', 'at least one assistant']),
    ({'messages': [{'role': 'bot', 'content': 'hi'}]}, ['mine.jsonl:2', 'role']),
    ({'messages': [{'role': 'assistant', 'content': 3}]}, ['mine.jsonl:2', 'content']),
    ('{"text": "unterminated', ['mine.jsonl:2', 'not valid JSON']),
])
def test_bad_jsonl_fails_with_one_line(enc, tmp_path, capsys, row, phrases):
    path = write_jsonl(tmp_path / 'mine.jsonl', [{'text': 'fine'}, row, {'text': 'fine too'}])
    fails(capsys, lambda: tasks.task_tensors(path, 'train', enc, 4, 64), *phrases)


def test_jsonl_with_empty_validation_split(enc, tmp_path, capsys):
    path = write_jsonl(tmp_path / 'few.jsonl', [{'text': 'a'}, {'text': 'b'}])  # neither line hashes into val
    assert not any(tasks.is_val({'text': t}) for t in 'ab')
    fails(capsys, lambda: tasks.task_tensors(path, 'val', enc, 4, 64), 'val split', 'few.jsonl', '0 tokens')
    fails(capsys, lambda: tasks.task_tensors(str(tmp_path / 'nothere.jsonl'), 'val', enc, 4, 64), 'not found')


# 4. the cache (finetune.py --cache_dir) ------------------------------------------------------------------------------

def test_cache_holds_exactly_what_it_replaces(enc, tmp_path, monkeypatch):
    cache = str(tmp_path / 'cache')
    built = tasks.task_tensors('gsm8k', 'train', enc, 32, 2048)
    cached = tasks.task_tensors('gsm8k', 'train', enc, 32, 2048, cache_dir=cache)
    (name,) = os.listdir(cache)
    assert name.startswith('gsm8k_train_') and name.endswith('.npz')
    assert all(torch.equal(a, b) for a, b in zip(built, cached))

    def not_again(*args):
        raise AssertionError('rebuilt although the cache holds it')
    monkeypatch.setattr(tasks, 'packed_tokens', not_again)
    assert all(torch.equal(a, b) for a, b in zip(built, tasks.task_tensors('gsm8k', 'train', enc, 32, 2048,
                                                                             cache_dir=cache)))
    monkeypatch.undo()
    # anything the tokens depend on is in the file's name: another length, seed or tokenizer is another file
    other_enc = tiktoken.Encoding('bytes', pat_str=r"\S+|\s+", mergeable_ranks=enc._mergeable_ranks,
                                  special_tokens={EOT: 256})
    for args in ((32, 1024, 1337), (32, 2048, 1), (16, 2048, 1337)):
        tasks.task_tensors('gsm8k', 'train', enc, *args, cache_dir=cache)
    tasks.task_tensors('gsm8k', 'train', other_enc, 32, 2048, cache_dir=cache)
    assert len(os.listdir(cache)) == 5
    # a damaged file is rebuilt, not trusted
    with open(os.path.join(cache, name), 'wb') as f:
        f.write(b'not a zip file')
    assert all(torch.equal(a, b) for a, b in zip(built, tasks.task_tensors('gsm8k', 'train', enc, 32, 2048,
                                                                             cache_dir=cache)))
    assert not [f for f in os.listdir(cache) if f.endswith('.tmp')]


def test_cache_follows_a_task_file(enc, tmp_path):
    path, cache = tmp_path / 'mine.jsonl', str(tmp_path / 'cache')
    write_jsonl(path, [{'text': f'Document number {i}.'} for i in range(100)])
    before = tasks.task_tensors(str(path), 'train', enc, 16, 512, cache_dir=cache)
    write_jsonl(path, [{'text': f'Another document {i}.'} for i in range(100)])  # edited: a new key, new tokens
    after = tasks.task_tensors(str(path), 'train', enc, 16, 512, cache_dir=cache)
    assert not torch.equal(before[0], after[0]) and len(os.listdir(cache)) == 2
    assert torch.equal(after[0], tasks.task_tensors(str(path), 'train', enc, 16, 512)[0])
