"""Bad input across the scripts: damaged data and tokenizers, checkpoints of another format or architecture, resumes
that would mix runs, unwritable outputs and a full disk. Each case must stop its script with one line on stderr naming
the problem (after a progress bar, if training had started) and a non-zero exit, leave every file that existed before
byte for byte as it was (a log may only have grown) and leave no temporary file.

This file holds the cases not covered by the per-script tables (test_bad_input in test_pretrain.py, test_finetune.py,
test_quantize.py and test_evaluate.py); `python -m pytest --collect-only -q tests | grep -c 'test_bad_input\\['`
counts them all.
"""
import builtins
import contextlib
import json
import os
import re
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

# a pretraining run stopped at iteration 6 of 12 (checkpoints every 3) and a finished 4-step fine-tuning run
PRETRAIN = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
            '--gradient_accumulation_steps=1', '--max_iters=12', '--warmup_iters=2', '--eval_interval=3',
            '--eval_iters=2', '--log_interval=1', '--device=cpu', '--dtype=float32']
FINETUNE = ['--task=gsm8k', '--batch_size=4', '--gradient_accumulation_steps=2', '--val_tokens=1024', '--eval_iters=2',
            '--eval_interval=2', '--max_tokens=1024', '--device=cpu', '--dtype=float32']
EVALUATE = ['--eval_iters=1', '--batch_size=2', '--device=cpu']
PROGRESS_BAR = re.compile(r'^(pretrain|finetune \S+): +\d+%\|')

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def runs(wiki, tiny_ckpt, fork_script, tmp_path_factory):
    """Outputs the cases start from (copied per case): a stopped pretraining run and a finished fine-tuning run."""
    pretrain, finetune = (str(tmp_path_factory.mktemp(name)) for name in ('stopped_pretrain', 'finished_finetune'))
    for script, args in (('pretrain.py', [f'--data_root={os.path.dirname(wiki)}', f'--out_dir={pretrain}', *PRETRAIN,
                                          '--stop_at_iter=6']),
                         ('finetune.py', [f'--init_from={tiny_ckpt}', f'--out_dir={finetune}', *FINETUNE])):
        result = fork_script(script, *args).wait()
        assert result.returncode == 0, result.stderr[-3000:]
    return {'pretrain.py': pretrain, 'finetune.py': finetune}


class Case:
    """What one case works with: tmp (its directory), out (the outputs that must survive), wiki, tiny_ckpt."""

    def __init__(self, tmp, out, wiki, tiny_ckpt):
        self.tmp, self.out, self.wiki, self.tiny_ckpt = tmp, out, wiki, tiny_ckpt

    def data(self, damage):
        """A copy of the prepared wiki data as data_root/wiki_en, damaged by damage(its directory); its data_root."""
        copy = os.path.join(self.tmp, 'data', 'wiki_en')
        shutil.copytree(self.wiki, copy)
        damage(copy)
        return os.path.dirname(copy)

    def checkpoint(self, change, source=None, name='other.pt'):
        """A copy of a checkpoint (default: tiny_ckpt) with change(dict) applied; its path."""
        ckpt = torch.load(source or self.tiny_ckpt, weights_only=False)
        change(ckpt)
        path = os.path.join(self.tmp, name)
        torch.save(ckpt, path)
        return path

    def a_file(self):
        path = os.path.join(self.tmp, 'a_file')
        with open(path, 'w') as f:
            f.write('not a directory')
        return path


def edit_json(path, **changes):
    """Set keys of a JSON file ('a.b' = nested)."""
    with open(path) as f:
        content = json.load(f)
    for key, value in changes.items():
        target = content
        *parents, last = key.split('.')
        for part in parents:
            target = target[part]
        target[last] = value
    with open(path, 'w') as f:
        json.dump(content, f)


# damage to a prepared dataset directory
def meta(**changes):
    return lambda d: edit_json(os.path.join(d, 'meta.json'), **changes)


def remove(name):
    return lambda d: os.remove(os.path.join(d, name))


def cut(name, size):
    return lambda d: os.truncate(os.path.join(d, name), size)


def as_uint32(d):  # the right tokens, written with the wrong dtype
    np.fromfile(os.path.join(d, 'train.bin'), dtype=np.uint16).astype(np.uint32).tofile(os.path.join(d, 'train.bin'))


def garble(d):
    size = os.path.getsize(os.path.join(d, 'train.bin'))
    with open(os.path.join(d, 'train.bin'), 'wb') as f:
        f.write(b'\xff' * size)


def other_bpe(d):  # a tokenizer file other than the one the data was tokenized with (the first 300 of 512 tokens)
    with open(os.path.join(d, 'tokenizer.tiktoken'), 'rb') as f:
        lines = f.readlines()
    with open(os.path.join(d, 'tokenizer.tiktoken'), 'wb') as f:
        f.writelines(lines[:300])


def resume_on(damage):
    return lambda t: ['--init_from=resume', f'--data_root={t.data(damage)}']


# changes to a checkpoint
def hf_names(ckpt):  # the same weights under another architecture's names (Hugging Face OLMo's)
    ckpt['model'] = {'model.' + k.replace('blocks.', 'layers.'): v for k, v in ckpt['model'].items()}


def pop(key):
    return lambda ckpt: ckpt.pop(key)


def put(**items):
    return lambda ckpt: ckpt.update(items)


def resume_changed(change):
    """Resume out_dir/ckpt.pt after change(its dict)."""
    def make(t):
        t.checkpoint(change, source=os.path.join(t.out, 'ckpt.pt'), name=os.path.join(t.out, 'ckpt.pt'))
        return ['--init_from=resume']
    return make


def start_from(change, *args):
    return lambda t: [f'--init_from={t.checkpoint(change)}', *args]


def under_a_file(key, name):
    return lambda t: [f'--{key}={os.path.join(t.a_file(), name)}']


def fixed(*args):
    return lambda t: list(args)


def in_out(do, *args):
    """do(out) first: change the outputs a case starts from."""
    def make(t):
        do(t.out)
        return list(args)
    return make


# analysis.py inputs
def results(bad):
    """Two good result.json files of different base models, then bad(case)."""
    return lambda t: [write_result(t, 'adamw.json', RESULT),
                      write_result(t, 'sam.json', {**RESULT, 'init_from': 'out/sam'}), bad(t)]


RESULT = {'task': 'gsm8k', 'init_from': 'out/adamw', 'learning_rate': 1e-3, 'base': {'pt_val_loss': 3.0},
          'final': {'ft_val_loss': 2.0, 'pt_val_loss': 3.5}}


def write_result(t, name, result):
    path = os.path.join(t.out, name)
    with open(path, 'w') as f:
        json.dump(result, f)
    return path


def bad_jsonl(t):
    path = os.path.join(t.tmp, 'corpus.jsonl')
    with open(path, 'w') as f:
        f.write('{"text": "a fine first line"}\n{"text": "cut sh\n')
    return path


ALL = ''
# name: (script, make_args(case) -> arguments after the script's usual ones, key phrases of the error line, options);
# options: full_disk = the prefix of the names of files under out_dir whose writes fail with ENOSPC (ALL: every file),
# log_grows = the run trains before it fails, so its log.jsonl may have grown
CASES = {
    # pretrain.py: data files and tokenizer
    'pretrain/train_bin_wrong_dtype': ('pretrain.py', resume_on(as_uint32), ['train.bin has', 'but meta.json says'],
                                       {}),
    'pretrain/meta_unsupported_dtype': ('pretrain.py', resume_on(meta(dtype='int64')),
                                        ['dtype must be uint16 or uint32', "'int64'"], {}),
    'pretrain/val_bin_missing': ('pretrain.py', resume_on(remove('val.bin')), ['val.bin is missing'], {}),
    'pretrain/meta_json_truncated': ('pretrain.py', resume_on(cut('meta.json', 40)), ['meta.json is corrupt'], {}),
    'pretrain/token_ids_past_vocab': ('pretrain.py', resume_on(garble), ['train.bin holds token id 65535 >= vocab'],
                                      {}),
    # pretrain.py: a resume that would mix runs
    'pretrain/resume_other_tokenizer': ('pretrain.py', resume_on(meta(**{'tokenizer.hash': '0123456789abcdef'})),
                                        ['tokenized differently'], {}),
    'pretrain/resume_other_dataset': ('pretrain.py', resume_on(meta(fingerprint='0123456789abcdef')),
                                      ['is not the data', 'ckpt.pt was trained on', 'fingerprint'], {}),
    'pretrain/resume_newer_format': ('pretrain.py', resume_changed(put(format_version=2)),
                                     ['ckpt.pt has checkpoint format 2', 'reads format 1'], {}),
    'pretrain/resume_no_format': ('pretrain.py', resume_changed(pop('format_version')),
                                  ['ckpt.pt has checkpoint format none'], {}),
    'pretrain/resume_without_optimizer': ('pretrain.py', resume_changed(pop('optimizer')),
                                          ['holds no optimizer state', '--init_from=<its path>'], {}),
    'pretrain/resume_finetune_checkpoint': ('pretrain.py', resume_changed(put(finetune={})),
                                            ['written by finetune.py'], {}),
    # pretrain.py: checkpoints to start from
    'pretrain/init_from_other_architecture': ('pretrain.py', start_from(hf_names, '--overwrite=True'),
                                              ["other.pt does not match this code's model (Missing key(s)"], {}),
    'pretrain/init_from_other_model_args': ('pretrain.py', start_from(lambda c: c['model_args'].update(n_experts=8),
                                                                      '--overwrite=True'),
                                            ["does not match this code's model", 'n_experts'], {}),
    'pretrain/init_from_not_a_checkpoint': ('pretrain.py', start_from(lambda c: c.clear(), '--overwrite=True'),
                                            ['not a checkpoint written by this repository'], {}),
    'pretrain/keep_optimizer_state_without_one': ('pretrain.py', start_from(pop('optimizer'), '--overwrite=True',
                                                                            '--keep_optimizer_state=True'),
                                                  ['holds no optimizer state', '--keep_optimizer_state=False'], {}),
    # pretrain.py: config values
    'pretrain/max_bad_steps_negative': ('pretrain.py', fixed('--max_bad_steps=-1'),
                                        ['max_bad_steps must be an int >= 0'], {}),
    'pretrain/bool_key_not_bool': ('pretrain.py', fixed('--compile=maybe'),
                                   ["compile must be True or False, got str 'maybe'"], {}),
    'pretrain/int_key_given_float': ('pretrain.py', fixed('--stop_at_iter=5.5'),
                                     ['stop_at_iter must be -1 or an int >= 0, got float 5.5'], {}),
    'pretrain/model_past_address_space': ('pretrain.py', fixed('--n_embd=16777216', '--n_head=2', '--overwrite=True'),
                                          ['out of memory: lower n_layer, n_embd', 'GiB at once'], {}),
    # pretrain.py: outputs
    'pretrain/out_dir_under_a_file': ('pretrain.py', under_a_file('out_dir', 'run'),
                                      ['could not write', 'Not a directory'], {}),
    'pretrain/disk_full_at_checkpoint': ('pretrain.py', fixed('--init_from=resume'),
                                         ['could not write', 'ckpt.pt (No space left on device)'],
                                         {'full_disk': '.ckpt.pt.', 'log_grows': True}),
    'pretrain/disk_full_at_start': ('pretrain.py', fixed('--init_from=resume'),
                                    ['could not write', 'log.jsonl (No space left on device)'], {'full_disk': ALL}),
    # finetune.py
    'finetune/resume_without_checkpoint': ('finetune.py', in_out(remove('ckpt.pt'), '--init_from=resume'),
                                           ['nothing to resume', 'ckpt.pt does not exist'], {}),
    'finetune/resume_pretrain_checkpoint': ('finetune.py', lambda t: in_out(lambda d: shutil.copy(t.tiny_ckpt, d),
                                                                            '--init_from=resume')(t),
                                            ['ckpt.pt was not written by finetune.py'], {}),
    'finetune/resume_other_task_data': ('finetune.py', resume_changed(put(task_fingerprint='0123456789abcdef')),
                                        ['the gsm8k data (offline) differs from the data', 'fingerprint'], {}),
    'finetune/resume_other_pretrain_data': ('finetune.py', lambda t: ['--init_from=resume', '--pretrain_data=' +
                                                                      t.data(meta(fingerprint='0' * 16)) + '/wiki_en'],
                                            ['is not the pretraining data', 'fingerprint differs'], {}),
    'finetune/resume_other_batch_size': ('finetune.py', fixed('--init_from=resume', '--batch_size=2'),
                                         ['resume: batch_size=2 but', 'trained with 4'], {}),
    'finetune/resume_newer_format': ('finetune.py', resume_changed(put(format_version=2)), ['checkpoint format 2'], {}),
    'finetune/base_other_architecture': ('finetune.py', start_from(hf_names),
                                         ["other.pt does not match this code's model (Missing key(s)"], {}),
    'finetune/base_tokenizer_file_replaced': ('finetune.py', lambda t: [f'--pretrain_data={t.data(other_bpe)}/wiki_en'],
                                              ['tokenizer.tiktoken does not match', 'tokenized with'], {}),
    'finetune/max_bad_steps_negative': ('finetune.py', fixed('--max_bad_steps=-2'),
                                        ['max_bad_steps must be an int >= 0'], {}),
    'finetune/out_dir_under_a_file': ('finetune.py', under_a_file('out_dir', 'run'),
                                      ['could not write', 'Not a directory'], {}),
    'finetune/disk_full': ('finetune.py', lambda t: [f'--out_dir={os.path.join(t.out, "new")}'],
                           ['could not write', 'result.json (No space left on device)'], {'full_disk': ALL}),
    # quantize.py
    'quantize/other_architecture': ('quantize.py', start_from(hf_names), ["other.pt does not match this code's model"],
                                    {}),
    'quantize/newer_format': ('quantize.py', start_from(put(format_version=7)), ['other.pt has checkpoint format 7'],
                              {}),
    'quantize/out_dir_under_a_file': ('quantize.py', under_a_file('out_dir', 'q'),
                                      ['could not write', 'Not a directory'], {}),
    'quantize/disk_full': ('quantize.py', fixed(), ['could not write', 'ckpt.pt (No space left on device)'],
                           {'full_disk': ALL}),
    # evaluate.py
    'evaluate/other_architecture': ('evaluate.py', lambda t: [f'--checkpoints={t.tiny_ckpt},{t.checkpoint(hf_names)}'],
                                    ["other.pt does not match this code's model (Missing key(s)"], {}),
    'evaluate/not_a_checkpoint': ('evaluate.py', lambda t: [f'--checkpoints={t.checkpoint(pop("model_args"))}'],
                                  ['not a checkpoint written by this repository'], {}),
    'evaluate/out_under_a_file': ('evaluate.py', under_a_file('out', 'eval.json'),
                                  ['could not write', 'File exists: ', 'a_file)'], {}),
    'evaluate/disk_full': ('evaluate.py', fixed(), ['could not write', 'eval.json (No space left on device)'],
                           {'full_disk': ALL}),
    # prepare.py
    'prepare/tokenizer_not_matching_its_data': ('prepare.py', lambda t: [f'--tokenizer={t.data(other_bpe)}/wiki_en'],
                                                ['tokenizer.tiktoken does not match', 'tokenized with'], {}),
    'prepare/unreadable_jsonl': ('prepare.py', lambda t: [f'--source={bad_jsonl(t)}'],
                                 ['corpus.jsonl is unreadable', 'JSONDecodeError'], {}),
    'prepare/vocab_size_too_small': ('prepare.py', fixed('--vocab_size=257'),
                                     ['vocab_size must be an int >= 258 and <= 2**32-1, got 257'], {}),
    'prepare/val_fraction_one': ('prepare.py', fixed('--val_fraction=1.0'),
                                 ['val_fraction must be a number > 0 and < 1, got 1.0'], {}),
    'prepare/data_root_is_a_file': ('prepare.py', lambda t: [f'--data_root={t.a_file()}'],
                                    ['could not write', 'Not a directory'], {}),
    'prepare/disk_full': ('prepare.py', fixed(), ['could not write', 'train.bin (No space left on device)'],
                          {'full_disk': ALL}),
    'prepare/disk_full_streamed_val': ('prepare.py', lambda t: [f'--tokenizer={t.wiki}'],
                                       ['could not write', 'val.bin (No space left on device)'], {'full_disk': '.val'}),
    # analysis.py
    'analysis/result_is_a_directory': ('analysis.py', results(lambda t: t.tmp), ['cannot read JSON', 'Is a directory'],
                                       {}),
    'analysis/unfinished_run': ('analysis.py', results(lambda t: write_result(t, 'unfinished.json',
                                                                              {**RESULT, 'final': None})),
                                ['unfinished.json: the run has not finished', '--init_from=resume'], {}),
}


@contextlib.contextmanager
def full_disk(directory, prefix):
    """Files under directory whose names start with prefix, opened for writing, are /dev/full: every write to them
    fails with ENOSPC, as on a full disk (directory entries can still be made)."""
    real_open = builtins.open

    def open_(file, mode='r', *args, **kwargs):
        if (isinstance(file, (str, os.PathLike)) and set(mode) & set('wax')
                and os.path.abspath(file).startswith(directory + os.sep) and os.path.basename(file).startswith(prefix)):
            return real_open('/dev/full', mode.replace('x', 'w'), *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)
    with mock.patch('builtins.open', open_):
        yield


def snapshot(directory):
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), 'rb') as f:
                files[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return files


def usual_args(script, t, wiki):
    """The arguments a case's script gets before the case's own (which win), and what t.out holds."""
    if script == 'pretrain.py':
        return [f'--data_root={os.path.dirname(wiki)}', f'--out_dir={t.out}', *PRETRAIN]
    if script == 'finetune.py':  # --overwrite=True: a failing start must destroy nothing even so
        return [f'--init_from={t.tiny_ckpt}', f'--out_dir={t.out}', *FINETUNE, '--overwrite=True']
    if script == 'quantize.py':
        return [f'--init_from={t.tiny_ckpt}', f'--out_dir={t.out}']
    if script == 'evaluate.py':
        with open(os.path.join(t.out, 'eval.json'), 'w') as f:
            f.write('{"an": "earlier result"}\n')
        return [f'--checkpoints={t.tiny_ckpt}', f'--out={os.path.join(t.out, "eval.json")}', *EVALUATE,
                '--overwrite=True']
    if script == 'prepare.py':  # a new dataset beside an earlier one
        shutil.copytree(wiki, os.path.join(t.out, 'wiki_en'))
        return [f'--data_root={t.out}', '--dataset=new', '--max_docs=40', '--vocab_size=300']
    return []


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input(run_script, runs, wiki, tiny_ckpt, tmp_path, name):
    script, make_args, phrases, options = CASES[name]
    out = str(tmp_path / 'out')
    if script in runs:
        shutil.copytree(runs[script], out)
    else:
        os.makedirs(out)
        with open(os.path.join(out, 'notes.txt'), 'w') as f:
            f.write('an earlier result')
    t = Case(str(tmp_path), out, wiki, tiny_ckpt)
    args = usual_args(script, t, wiki) + make_args(t)
    before = snapshot(tmp_path)
    with full_disk(out, options['full_disk']) if 'full_disk' in options else contextlib.nullcontext():
        result = run_script(script, *args)
    assert result.returncode != 0
    # what a terminal shows, without the progress bar of a run that had started training
    lines = [line.rsplit('\r', 1)[-1] for line in result.stderr.split('\n')]
    lines = [line for line in lines if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f'{script}: error: '), result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    after = snapshot(tmp_path)
    for path, content in before.items():
        if options.get('log_grows') and path.endswith('log.jsonl'):
            assert after[path].startswith(content), path
        else:
            assert after[path] == content, path
    assert not [path for path in after if path.endswith('.tmp')]
