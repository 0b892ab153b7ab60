"""
Turn a text source into data/<dataset>/{train.bin, val.bin, tokenizer.tiktoken, meta.json}.

    python prepare.py                                      # English Wikipedia leads, 4096-token BPE
    python prepare.py --dataset=wiki_fr --source=wiki_fr --tokenizer=data/wiki_en  # base model's tokenizer
    python prepare.py --dataset=dclm --source=hf:mlfoundations/dclm-baseline-1.0 --max_tokens=100000000
    python prepare.py --dataset=mine --source='corpus/*.jsonl' --tokenizer=gpt2

Train and val are split by document, so no validation text is ever seen in training (not even by
the BPE trainer). With --tokenizer=bpe the documents are in memory anyway (to train the BPE): a
seeded permutation splits them, round(val_fraction * n) to val. Otherwise they stream from the source
to the files in source order, memory bounded whatever max_tokens: document i goes to val when a
hash of (seed, i) says so, with probability val_fraction; if none did, the last document goes there.
"""
import contextlib
import glob
import hashlib
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import tiktoken
from tqdm import tqdm

import keys
from checkpoint import atomic_path, write_json
from config import check, config_defaults, fail, load_config
from data import (WIKI, get_named_encoding, hf_rows, hf_to_tiktoken, load_meta, load_tokenizer, tiktoken_bpe_bytes,
                  train_bpe, wiki_texts)

EXTS = ('.txt', '.jsonl', '.parquet')
# -----------------------------------------------------------------------------
dataset = 'wiki_en'  # output directory name under data_root
data_root = 'data'
source = 'wiki_en'  # wiki_en | wiki_fr | wiki_es | hf:<name> | .txt/.jsonl/.parquet file, directory or glob
hf_config = ''
hf_split = 'train'
text_field = 'text'  # jsonl field / parquet column / hf column holding the text
max_docs = -1  # -1 = all
max_tokens = -1  # stop reading once this many tokens were produced (whole documents); -1 = all
tokenizer = 'bpe'  # 'bpe' (train here) | tiktoken encoding name | path of a prepared dataset to share its tokenizer
vocab_size = 4096  # bpe only, counts <|endoftext|>
val_fraction = 0.05
seed = 1337
overwrite = False
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.PREPARE)
globals().update(config)
check(not source.startswith('hf:') or max_docs > 0 or max_tokens > 0,
      f"source {source} is streamed from the hub: set --max_tokens (or --max_docs) to say how much to read")
out_dir = os.path.join(data_root, dataset)
settings = json.loads(json.dumps({k: v for k, v in config.items() if k != 'overwrite'}))  # as meta.json holds them
if os.path.exists(os.path.join(out_dir, 'meta.json')) and not overwrite:
    with open(os.path.join(out_dir, 'meta.json')) as f:
        prepared_with = json.load(f).get('config')
    if prepared_with == settings:  # rerunning a setup script is not an error
        print(f"{out_dir} is already prepared with these settings; nothing to do")
        sys.exit(0)
    fail(f"{out_dir} already holds a dataset prepared with other settings; pass --overwrite=True to replace it")
t0 = time.time()


def hf_texts(name):
    for row in hf_rows(name, hf_config, hf_split):
        check(text_field in row, f"hf dataset {name} has no field {text_field!r} (has {', '.join(row)})")
        yield row[text_field]


def file_texts(path):
    try:
        if path.endswith('.txt'):
            with open(path, encoding='utf-8-sig') as f:  # -sig: a leading byte-order mark is not text
                yield f.read()
        elif path.endswith('.jsonl'):
            with open(path, encoding='utf-8-sig') as f:
                for lineno, line in enumerate(f, 1):
                    row = json.loads(line) if line.strip() else {text_field: ''}
                    check(isinstance(row, dict) and isinstance(row.get(text_field), str),
                          f"{path}:{lineno}: no string field {text_field!r}; set --text_field")
                    yield row[text_field]
        else:
            import pyarrow.parquet as pq
            columns = pq.ParquetFile(path).schema_arrow.names
            check(text_field in columns,
                  f"{path} has no column {text_field!r} (has {', '.join(columns)}); set --text_field")
            for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
                yield from batch.column(0).to_pylist()
    except (OSError, ValueError) as e:  # undecodable text, bad JSON line, not parquet, ...
        fail(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def read_texts():
    """Non-empty documents of the source, at most max_docs, streamed."""
    if source in WIKI:
        texts = wiki_texts(source)
    elif source.startswith('hf:'):
        texts = hf_texts(source[3:])
    else:
        if os.path.isdir(source):
            files = [p for p in glob.glob(os.path.join(source, '**', '*'), recursive=True) if p.endswith(EXTS)]
        else:
            files = ([source] if os.path.isfile(source) else
                     [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)])
        check(files, f"source {source!r} is not wiki_en/wiki_fr/wiki_es, hf:NAME, or an existing "
                     f"{'/'.join(EXTS)} file, directory or glob")
        check(all(p.endswith(EXTS) for p in files), f"source {source!r} matches files that are not {'/'.join(EXTS)}")
        texts = itertools.chain.from_iterable(map(file_texts, sorted(files)))
    texts = (t for t in texts if isinstance(t, str) and t.strip())
    return itertools.islice(texts, max_docs) if max_docs > 0 else texts


def split_docs(n):
    """BPE: a seeded shuffle of document indices into (train, val)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    check(n_val < n, f"source {source!r} gave {n} document(s), too few for a train and a val split")
    return perm[n_val:], perm[:n_val]


def in_val(i):
    """Streamed: document i goes to val with probability val_fraction, by a seeded hash of its index."""
    h = hashlib.blake2b(f'{seed}/{i}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'little') < val_fraction * 2**64


def tokenized(texts):
    """Each document's tokens, <|endoftext|> last, in source order, until max_tokens were produced."""
    n_tokens = 0
    with tqdm(total=len(texts) if isinstance(texts, list) else None, unit='doc', disable=None) as pbar:
        texts = iter(texts)
        while batch := list(itertools.islice(texts, 1024)):  # in batches for encode_ordinary_batch's threads
            for ids in enc.encode_ordinary_batch(batch):
                yield np.array(ids + [enc.eot_token], dtype=dtype)
                n_tokens += len(ids) + 1
                if 0 < max_tokens <= n_tokens:
                    return
            pbar.update(len(batch))


def streamed(tokens):
    """(split, tokens) of each document in source order, split by in_val; if none went to val, the last one does
    (it is held back one document for that)."""
    held, any_val = None, False
    for i, ids in enumerate(tokens):
        if held is not None:
            yield held
        held = ('val' if in_val(i) else 'train', ids)
        any_val |= held[0] == 'val'
    if held is not None:
        yield ('val' if not any_val else held[0]), held[1]


# the tokenizer, unless trained on the documents below
texts = read_texts()
if tokenizer == 'bpe':
    # BPE training needs the text up front; byte-level BPE gives well under 8 characters per token, so reading
    # 8*max_tokens characters is enough
    docs, n_chars = [], 0
    while not 0 < 8 * max_tokens <= n_chars and (text := next(texts, None)) is not None:
        docs.append(text)
        n_chars += len(text)
    check(docs, f"source {source!r} holds no documents")
    train_idx, val_idx = split_docs(len(docs))
    print(f"training a {vocab_size}-token byte-level BPE on {len(train_idx):,} documents")
    enc = hf_to_tiktoken(train_bpe([docs[i] for i in train_idx], vocab_size))
    tok_name, tok_file = 'bpe', 'tokenizer.tiktoken'
elif os.path.isdir(tokenizer):
    tok_meta = load_meta(tokenizer)
    enc, tok_name, tok_file = load_tokenizer(tok_meta), tok_meta['tokenizer']['name'], tok_meta['tokenizer']['file']
elif tokenizer in tiktoken.list_encoding_names():
    enc, tok_name, tok_file = get_named_encoding(tokenizer), tokenizer, None
else:
    fail(f"tokenizer must be 'bpe', a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())}) "
         f"or a prepared dataset directory; got {tokenizer!r}")
dtype = np.uint16 if enc.n_vocab < 2**16 else np.uint32

# the documents in the order they are written: BPE's are in memory anyway (the seeded permutation's train documents,
# then its val ones; those past max_tokens were read for the BPE trainer but are not kept); otherwise they stream
# from the source to the files, so memory does not grow with max_tokens
if tokenizer == 'bpe':
    tokens = list(tokenized(docs))
    documents = [(split, tokens[i]) for split, idx in (('train', train_idx), ('val', val_idx)) for i in idx
                 if i < len(tokens)]
else:
    documents = streamed(tokenized(texts))

# write: the token files (each appears whole, by a rename), the tokenizer, then meta.json, whose presence marks the
# directory complete; the fingerprint hashes train.bin then val.bin
paths = {split: os.path.join(out_dir, f'{split}.bin') for split in ('train', 'val')}
counts = {f'{split}_{n}': 0 for split in paths for n in ('tokens', 'docs')}
fingerprint = hashlib.sha256()
with atomic_path(paths['train']) as train_tmp, atomic_path(paths['val']) as val_tmp, \
        open(train_tmp, 'wb') as train_f, open(val_tmp, 'wb') as val_f:
    files = {'train': train_f, 'val': val_f}
    for split, ids in documents:
        try:  # flushed at once, so that an error names its own file (atomic_path can't tell which of the two failed)
            files[split].write(ids.tobytes())
            files[split].flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # closed now, so that its unwritten buffer fails only once
                files[split].close()
            fail(f"could not write {paths[split]} ({e.strerror or e})")
        if split == 'train':
            fingerprint.update(ids.tobytes())
        counts[f'{split}_tokens'] += len(ids)
        counts[f'{split}_docs'] += 1
    n_docs = counts['train_docs'] + counts['val_docs']
    check(n_docs, f"source {source!r} holds no documents")
    check(counts['train_docs'] and counts['val_docs'], f"the {'val' if counts['train_docs'] else 'train'} split is "
          f"empty ({n_docs} document(s) read); use more documents (max_tokens, max_docs) or another val_fraction")
    with open(val_tmp, 'rb') as f:
        while chunk := f.read(1 << 20):
            fingerprint.update(chunk)
    if os.path.exists(os.path.join(out_dir, 'meta.json')):  # overwrite=True: the old data stops counting as complete
        os.remove(os.path.join(out_dir, 'meta.json'))      # before it is replaced
tok_hash = None
if tok_file:  # trained here or copied: the data must carry its own tokenizer
    content = tiktoken_bpe_bytes(enc)
    with atomic_path(os.path.join(out_dir, tok_file)) as tmp, open(tmp, 'wb') as f:
        f.write(content)
    tok_hash = hashlib.sha256(content).hexdigest()[:16]
meta = {'dataset': dataset, 'source': source, 'vocab_size': enc.n_vocab, 'dtype': np.dtype(dtype).name,
        'eot_token': enc.eot_token, **counts,
        'tokenizer': {'name': tok_name, 'file': tok_file, 'pat_str': enc._pat_str,
                      'special_tokens': dict(enc._special_tokens), 'hash': tok_hash},
        'fingerprint': fingerprint.hexdigest()[:16],
        'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'config': settings}
write_json(meta, os.path.join(out_dir, 'meta.json'))
print(f"{out_dir}: {counts['train_docs']:,} train docs / {counts['train_tokens']:,} tokens, "
      f"{counts['val_docs']:,} val docs / {counts['val_tokens']:,} tokens, vocab {enc.n_vocab} ({meta['dtype']}, "
      f"tokenizer {tok_name}), {time.time() - t0:.1f}s")
