"""quantize.py: bitsandbytes NF4/FP4/8-bit and round-to-nearest post-training quantization of a checkpoint."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint import load_model  # noqa: E402

logging.getLogger('bitsandbytes').setLevel(logging.ERROR)  # an optional-kernel warning at import (see quantize.py)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

pytestmark = pytest.mark.usefixtures('one_thread')
LINEARS = ['attn.q_proj', 'attn.k_proj', 'attn.v_proj', 'attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (3, model.config.block_size), generator=g)
    with torch.no_grad():
        return model(x)[0]


@pytest.fixture(scope='module')
def nf4(tiny_ckpt, tmp_path_factory):
    """quantize.py --method=nf4 --save_packed=True, run as a user runs it (a fresh interpreter)."""
    out = tmp_path_factory.mktemp('nf4')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'quantize.py'), f'--init_from={tiny_ckpt}',
                             '--method=nf4', f'--out_dir={out}', '--save_packed=True'],
                            capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''  # not even bitsandbytes' import-time warning
    return out, result.stdout


def test_nf4_checkpoint_computes_what_bnb_linear4bit_computes(tiny_ckpt, nf4):
    out, stdout = nf4
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'quantization.json']
    assert 'MiB ->' in stdout and 'relative reconstruction error' in stdout
    quantized, ckpt = load_model(str(out / 'ckpt.pt'))  # loads like any checkpoint
    assert 'optimizer' not in ckpt and ckpt['quantization']['method'] == 'nf4'
    reference, source = load_model(tiny_ckpt)
    # bnb's own layer, quantizing the original weights itself (Params4bit quantizes when moved to the device)
    for block in reference.blocks:
        for name in LINEARS:
            parent, attr = block.get_submodule(name.split('.')[0]), name.split('.')[1]
            linear = getattr(parent, attr)
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                      compress_statistics=False, quant_type='nf4')
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type='nf4',
                                             blocksize=64, compress_statistics=False)
            setattr(parent, attr, layer.to('cpu'))
    assert isinstance(reference.blocks[0].attn.q_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(quantized), logits(reference), rtol=1e-5, atol=1e-5)
    original = load_model(tiny_ckpt)[0]
    assert (logits(quantized) - logits(original)).abs().max() > 1e-4  # quantization did change the model
    # the saved packed state rebuilds the same 4-bit weights
    for name, packed in ckpt['quantized_state'].items():
        weight = bnb.nn.Params4bit.from_prequantized(packed['data'], packed['quant_state'], device='cpu')
        assert torch.equal(bnbF.dequantize_4bit(weight.data, weight.quant_state), ckpt['model'][name])
    # only the block Linears changed; the rest of the checkpoint is the source's
    changed = {k for k in source['model'] if not torch.equal(source['model'][k], ckpt['model'][k])}
    assert changed == {f'blocks.0.{name}.weight' for name in LINEARS} == set(ckpt['quantized_state'])
    assert set(ckpt) == set(source) - {'optimizer'} | {'quantization', 'quantized_state'}
    for key in ('model_args', 'config', 'iter_num', 'tokenizer', 'data_fingerprint'):
        assert ckpt[key] == source[key]
    with open(out / 'quantization.json') as f:
        assert json.load(f) == json.loads(json.dumps(ckpt['quantization']))


def check_record(record, source, ckpt):
    """bytes and errors in the record are those of the tensors."""
    err_sq = norm_sq = 0.0
    for name, t in record['tensors'].items():
        w, q = source['model'][name], ckpt['model'][name]
        assert t['bytes_before'] == w.numel() * 4
        assert t['rel_error'] == pytest.approx(((w - q).norm() / w.norm()).item(), rel=1e-4)
        err_sq, norm_sq = err_sq + (w - q).norm().item() ** 2, norm_sq + w.norm().item() ** 2
    assert record['rel_error'] == pytest.approx((err_sq / norm_sq) ** 0.5, rel=1e-4)
    assert record['bytes_before'] == sum(t['bytes_before'] for t in record['tensors'].values())
    per_tensor = sum(t['bytes_after'] for t in record['tensors'].values())
    assert record['bytes_after'] == per_tensor + record['shared_map_bytes']
    model_bytes = sum(v.numel() * v.element_size() for v in source['model'].values())
    assert record['model_bytes_before'] == model_bytes
    assert record['model_bytes_after'] == model_bytes - record['bytes_before'] + record['bytes_after']


def ceil(a, b):
    return -(-a // b)


@pytest.mark.parametrize('args,tensor_bytes,map_bytes', [
    # 4-bit codes, a float32 absmax per block; the 16-level map (float32) once for the model
    (['--method=fp4'], lambda n: n // 2 + 4 * ceil(n, 64), 16 * 4),
    (['--method=nf4', '--blocksize=128'], lambda n: n // 2 + 4 * ceil(n, 128), 16 * 4),
    # double quantization: an 8-bit absmax per block, a float32 absmax per 256 of those, one float32 offset;
    # plus the 256-level map of the nested absmax, once
    (['--method=nf4', '--double_quant=True'], lambda n: n // 2 + ceil(n, 64) + 4 * ceil(ceil(n, 64), 256) + 4,
     16 * 4 + 256 * 4),
    (['--method=int8'], lambda n: n + 4 * ceil(n, 64), 256 * 4),
    # codes as if bit-packed, a float32 scale per group (asymmetric: and a bits-wide zero point)
    (['--method=rtn', '--bits=4', '--group_size=32'], lambda n: ceil(4 * n, 8) + 4 * (n // 32), 0),
    (['--method=rtn', '--bits=3', '--group_size=32', '--symmetric=False'],
     lambda n: ceil(3 * n, 8) + 4 * (n // 32) + ceil(3 * (n // 32), 8), 0),
])
def test_sizes_and_errors(run_script, tiny_ckpt, tmp_path, args, tensor_bytes, map_bytes):
    result = run_script('quantize.py', f'--init_from={tiny_ckpt}', f'--out_dir={tmp_path}', *args)
    assert result.returncode == 0, result.stderr
    source, ckpt = load(tiny_ckpt), load(tmp_path / 'ckpt.pt')
    record = ckpt['quantization']
    assert set(record['tensors']) == {f'blocks.0.{name}.weight' for name in LINEARS}
    for name, t in record['tensors'].items():
        assert t['bytes_after'] == tensor_bytes(source['model'][name].numel()), name
    assert record['shared_map_bytes'] == map_bytes
    check_record(record, source, ckpt)
    assert 0.001 < record['rel_error'] < 0.3


def test_rtn_8bit_rows_equal_llm_int8_weights_and_fewer_bits_err_more(run_script, tiny_ckpt, tmp_path):
    # LLM.int8's weight quantization (row-wise absmax to int8) is rtn with bits=8, one group per row, symmetric
    errors = {}
    for bits in (8, 4, 3, 2):
        out = tmp_path / str(bits)
        result = run_script('quantize.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}', '--method=rtn',
                            f'--bits={bits}', '--group_size=-1')
        assert result.returncode == 0, result.stderr
        errors[bits] = load(out / 'ckpt.pt')['quantization']['rel_error']
    source, ckpt = load(tiny_ckpt), load(tmp_path / '8' / 'ckpt.pt')
    for name in ckpt['quantization']['tensors']:
        codes, row_absmax, _ = bnbF.int8_vectorwise_quant(source['model'][name])
        torch.testing.assert_close(ckpt['model'][name], codes.float() * row_absmax[:, None] / 127, rtol=0, atol=1e-7)
    assert errors[8] < errors[4] < errors[3] < errors[2]


def test_rtn_levels_per_group(run_script, tiny_ckpt, tmp_path):
    result = run_script('quantize.py', f'--init_from={tiny_ckpt}', f'--out_dir={tmp_path}', '--method=rtn', '--bits=3',
                        '--group_size=16', '--symmetric=False')
    assert result.returncode == 0, result.stderr
    source, ckpt = load(tiny_ckpt), load(tmp_path / 'ckpt.pt')
    for name in ckpt['quantization']['tensors']:
        w, q = source['model'][name].reshape(-1, 16), ckpt['model'][name].reshape(-1, 16)
        assert all(len(group.unique()) <= 8 for group in q)  # 2^3 levels
        scale = (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 7
        assert ((w - q).abs() <= scale[:, None] / 2 + 1e-6).all()  # nearest level: within half a step


def test_embeddings_and_head(run_script, tiny_ckpt, tmp_path):
    result = run_script('quantize.py', f'--init_from={tiny_ckpt}', f'--out_dir={tmp_path}', '--method=int8',
                        '--quantize_embeddings=True', '--quantize_head=True')
    assert result.returncode == 0, result.stderr
    source, ckpt = load(tiny_ckpt), load(tmp_path / 'ckpt.pt')
    assert {'wte.weight', 'lm_head.weight'} < set(ckpt['quantization']['tensors'])
    for name in ('wte.weight', 'lm_head.weight'):
        expected = bnbF.dequantize_blockwise(*bnbF.quantize_blockwise(source['model'][name], blocksize=64))
        assert torch.equal(ckpt['model'][name], expected)
    assert torch.equal(ckpt['model']['norm_f.weight'], source['model']['norm_f.weight'])


# bad input: one line on stderr, a non-zero exit, nothing already written changed -------------------------------

def _bad_cases():
    def quantized(tmp_path, ckpt):
        shutil.copy(ckpt, tmp_path / 'source.pt')
        data = load(ckpt)
        data['quantization'] = {'method': 'nf4'}
        torch.save(data, tmp_path / 'source.pt')
        return [f'--init_from={tmp_path / "source.pt"}']

    def truncated(tmp_path, ckpt):
        shutil.copy(ckpt, tmp_path / 'source.pt')
        os.truncate(tmp_path / 'source.pt', os.path.getsize(tmp_path / 'source.pt') // 2)
        return [f'--init_from={tmp_path / "source.pt"}']

    def into_source_dir(tmp_path, ckpt):
        shutil.copy(ckpt, tmp_path / 'out' / 'ckpt.pt')
        return [f'--init_from={tmp_path / "out" / "ckpt.pt"}', '--overwrite=True']

    plain = lambda *args: lambda tmp_path, ckpt: [f'--init_from={ckpt}', *args]  # noqa: E731
    return {
        'already_quantized': (quantized, ['already quantized', 'nf4']),
        'missing_checkpoint': (lambda tmp_path, ckpt: [f'--init_from={tmp_path / "nope.pt"}'],
                               ['not found', 'nope.pt']),
        'corrupt_checkpoint': (truncated, ['source.pt', 'unreadable']),
        'no_init_from': (lambda tmp_path, ckpt: [], ['init_from']),
        'unknown_method': (plain('--method=gptq'), ['method', "'gptq'"]),
        'rtn_bits_low': (plain('--method=rtn', '--bits=1'), ['bits must be an int >= 2 and <= 8, got 1']),
        'rtn_bits_high': (plain('--method=rtn', '--bits=9'), ['bits must be an int >= 2 and <= 8, got 9']),
        'rtn_group_size': (plain('--method=rtn', '--group_size=48'), ['group_size 48', 'does not divide']),
        'nf4_blocksize': (plain('--method=nf4', '--blocksize=48'), ['blocksize 48', 'nf4']),
        'int8_blocksize': (plain('--method=int8', '--blocksize=32'), ['blocksize 32', 'int8']),
        'packed_rtn': (plain('--method=rtn', '--save_packed=True'), ['save_packed']),
        'out_dir_exists': (plain(), ['ckpt.pt exists', '--overwrite=True']),
        'record_exists': (plain(), ['quantization.json exists', '--overwrite=True']),
        'out_dir_is_source': (into_source_dir, ['holds the checkpoint being quantized']),
    }


BAD = _bad_cases()


def check_bad(run, tiny_ckpt, tmp_path, name):
    make_args, phrases = BAD[name]
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('an earlier result')
    if name == 'out_dir_exists':
        (out / 'ckpt.pt').write_bytes(b'an earlier checkpoint')
    if name == 'record_exists':
        (out / 'quantization.json').write_text('{"an": "earlier record"}')
    args = [*make_args(tmp_path, tiny_ckpt), f'--out_dir={out}']
    before = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    result = run('quantize.py', *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('quantize.py: error: '), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert {f: (out / f).read_bytes() for f in sorted(os.listdir(out))} == before


@pytest.mark.parametrize('name', list(BAD))
def test_bad_input(run_script, tiny_ckpt, tmp_path, name):
    check_bad(run_script, tiny_ckpt, tmp_path, name)


def test_bad_input_fresh_interpreter(fresh_script, tiny_ckpt, tmp_path):
    # a real start (bitsandbytes imported, the checkpoint loaded): its error is still the only line on stderr
    check_bad(fresh_script, tiny_ckpt, tmp_path, 'already_quantized')
