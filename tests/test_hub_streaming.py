"""The hub SFT datasets of the 1B recipe stream through `datasets` (tasks.hub_examples -> data.hf_rows, streaming=True)
and stop reading at max_tokens: the same code path run here on local parquet / JSONL files standing in for the hub."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks
from data import load_meta, load_tokenizer

N_ROWS = 20_000


def rows_of(task, i):
    """A row shaped like the hub dataset's (the fields tasks.HUB reads)."""
    if task == 'metamath':
        return {'query': f'What is {i} plus {i + 1}?', 'response': f'{i} plus {i + 1} is {2 * i + 1}.', 'type': 'x'}
    if task == 'stackmathqa':
        return {'Q': f'Simplify {i}/{2 * i}.', 'A': 'It is 1/2.', 'meta': {'url': 'x'}}
    if task == 'tulu':
        return {'id': str(i), 'messages': [{'role': 'system', 'content': 'Be brief.'},
                                           {'role': 'user', 'content': f'Count to {i % 7}.'},
                                           {'role': 'assistant', 'content': ' '.join(map(str, range(i % 7)))}]}
    return {'text': f'X:{i}\nT:Tune {i}\nK:G\nGABc dedB|' * 2}  # musicpile


@pytest.mark.parametrize('task, file_format', [('metamath', 'parquet'), ('stackmathqa', 'json'), ('tulu', 'parquet'),
                                               ('musicpile', 'json')])
def test_hub_task_streams_and_stops_at_max_tokens(task, file_format, wiki, tmp_path, monkeypatch):
    rows = [rows_of(task, i) for i in range(N_ROWS)]
    if file_format == 'parquet':
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'train-00000.parquet', row_group_size=1000)
    else:
        (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    name, config, data_dir, val_split, convert = tasks.HUB[task]
    read = []

    def counted(row):
        read.append(row)
        return convert(row)
    # the hub name replaced by `datasets`' builder for local files of that format; everything else as on the hub
    monkeypatch.setitem(tasks.HUB, task, (file_format, None, str(tmp_path), val_split, counted))
    tasks.packed_tokens.cache_clear()
    enc = load_tokenizer(load_meta(wiki))
    block, max_tokens = 64, 4096
    x, y, mask = tasks.task_tensors(task, 'train', enc, block, max_tokens, source='hub')
    assert x.shape == (max_tokens // block, block)
    assert mask.any()
    assert len(read) < N_ROWS // 20  # streamed: reading stopped once max_tokens were packed
    assert read[0] == rows[0] and read[-1] == rows[len(read) - 1]  # in the file's order, nothing skipped
    # the packed tokens are the encoded training rows, in order
    expected = []
    for row in read:
        example = convert(row)
        if not tasks.is_val(example):
            expected += tasks.encode_example(enc, example)[0]
    assert x[0].tolist() == expected[:block] and y[0].tolist() == expected[1:block + 1]
    tasks.packed_tokens.cache_clear()
