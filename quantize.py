"""
Post-training weight quantization, no calibration data (the paper's "forgetting after quantization").

    python quantize.py --init_from=out/cpu_sam/ckpt.pt --method=nf4 --out_dir=out/cpu_sam_nf4
    python quantize.py --init_from=out/cpu_sam/ckpt.pt --method=rtn --bits=3 --group_size=64 --out_dir=out/sam_rtn3
    python quantize.py --init_from=hf:allenai/OLMo-2-0425-1B --pretrain_data=data/dolmino --out_dir=out/olmo2_1b_nf4

Methods, applied to every nn.Linear weight of the transformer blocks (quantize_embeddings / quantize_head add wte /
lm_head): nf4 and fp4 (bitsandbytes 4-bit blockwise, what load_in_4bit computes with), int8 (bitsandbytes blockwise
8-bit, weight-only; not LLM.int8) and rtn (plain round-to-nearest, 2-8 bits, groups along the input dimension).
out_dir/ckpt.pt holds the dequantized weights in pretrain.py's format, so every script loads it like any checkpoint;
out_dir/quantization.json records sizes and reconstruction errors. Details: docs/measurement.md.
"""
import logging
import os
import sys
import time

import torch
import torch.nn as nn

import keys
from checkpoint import build_model, code_version, load_model, save_checkpoint, write_json
from config import check, config_defaults, fail, load_config
from hf import hf_as_checkpoint, is_hf_source

# bitsandbytes' CPU backend logs a warning at import when an optional Hub kernel is absent (not used here);
# silenced so that a bad-input error stays the only line on stderr
logging.getLogger('bitsandbytes').setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF  # noqa: E402

# -----------------------------------------------------------------------------
init_from = ''  # checkpoint to quantize: ours, or a Hugging Face model (hf:NAME or a directory; see hf.py)
hf_revision = ''  # with init_from=hf:NAME: Hub branch, tag or commit ('' = main)
pretrain_data = ''  # Hugging Face init_from only: a dataset prepared with its tokenizer (checked, and recorded)
out_dir = ''
overwrite = False  # allow replacing out_dir/ckpt.pt
method = 'nf4'  # 'nf4' | 'fp4' | 'int8' | 'rtn'
blocksize = 64  # nf4/fp4/int8: weights per absmax
double_quant = False  # nf4/fp4/int8: quantize the absmax values too (bnb compress_statistics / nested)
bits = 4  # rtn
group_size = 128  # rtn: weights per scale along the input dimension; -1 = one group per row
symmetric = True  # rtn
quantize_embeddings = False
quantize_head = False
save_packed = False  # nf4/fp4: also store the packed 4-bit state (to rebuild bnb Linear4bit layers)
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.QUANTIZE)
globals().update(config)
# the block sizes bitsandbytes documents for its kernels (the CPU op takes more for 8-bit; CUDA does not)
BNB_BLOCKSIZES = {'nf4': (32, 64, 128, 256, 512, 1024, 2048, 4096), 'fp4': (32, 64, 128, 256, 512, 1024, 2048, 4096),
                  'int8': (64, 128, 256, 512, 1024, 2048, 4096)}
if method != 'rtn':
    check(blocksize in BNB_BLOCKSIZES[method],
          f"blocksize {blocksize} is not supported by bitsandbytes {method}; use one of {BNB_BLOCKSIZES[method]}")
check(not save_packed or method in ('nf4', 'fp4'), f"save_packed is for nf4/fp4 (Linear4bit); not for {method}")
ckpt_path, record_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'quantization.json')
if os.path.exists(ckpt_path) and os.path.exists(init_from) and os.path.samefile(ckpt_path, init_from):
    fail(f"out_dir {out_dir} holds the checkpoint being quantized; pick another --out_dir")
for path in (ckpt_path, record_path):
    check(overwrite or not os.path.exists(path), f"{path} exists: pick another --out_dir or pass --overwrite=True")

# model ------------------------------------------------------------------------
if is_hf_source(init_from):
    original = hf_as_checkpoint(init_from, hf_revision, pretrain_data)
    model = build_model(original['model_args'], original['model'], init_from).eval()
else:
    model, original = load_model(init_from)
if 'quantization' in original:
    fail(f"{init_from} is already quantized ({original['quantization'].get('method')}); "
         f"quantize the original checkpoint")
names = [f'blocks.{name}.weight' for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
names += ['wte.weight'] * quantize_embeddings + ['lm_head.weight'] * quantize_head
state = model.state_dict()
if method == 'rtn' and group_size != -1:
    for name in names:
        check(state[name].shape[-1] % group_size == 0,
              f"group_size {group_size} does not divide the input dimension {state[name].shape[-1]} of {name}")


def nbytes(t):
    return t.numel() * t.element_size()


def quantize_bnb(w):
    """(dequantized w, packed data, QuantState) with bitsandbytes' own blockwise kernels."""
    if method in ('nf4', 'fp4'):
        packed, qstate = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=method, compress_statistics=double_quant)
        return bnbF.dequantize_4bit(packed, qstate), packed, qstate
    packed, qstate = bnbF.quantize_blockwise(w, blocksize=blocksize, nested=double_quant)
    return bnbF.dequantize_blockwise(packed, qstate), packed, qstate


def bnb_bytes(packed, qstate):
    """(bytes of the codes and per-block statistics, {name: bytes} of the level maps shared by all tensors)."""
    stats = [qstate.absmax] + ([qstate.state2.absmax, qstate.offset.reshape(-1)] if qstate.nested else [])
    maps = {f'{method}_code': nbytes(qstate.code)}
    if qstate.nested:
        maps['nested_code'] = nbytes(qstate.state2.code)
    return nbytes(packed) + sum(map(nbytes, stats)), maps


def quantize_rtn(w, bits, group_size, symmetric):
    """(dequantized w, packed bytes): round-to-nearest over groups of group_size weights along the last dimension."""
    groups = w.reshape(-1, w.shape[-1] if group_size == -1 else group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
        dequant = torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale
        zero_bytes = 0
    else:
        qmax = 2 ** bits - 1
        lo, hi = groups.amin(1, keepdim=True).clamp(max=0), groups.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        dequant = (torch.clamp(torch.round(groups / scale) + zero, 0, qmax) - zero) * scale
        zero_bytes = -(-len(groups) * bits // 8)
    return dequant.reshape(w.shape), -(-w.numel() * bits // 8) + nbytes(scale) + zero_bytes


# quantize ----------------------------------------------------------------------
t0 = time.time()
new_state, tensors, packed_state, shared_maps = dict(state), {}, {}, {}
err_sq = norm_sq = 0.0
for name in names:
    w = state[name].float()
    if method == 'rtn':
        dequant, size = quantize_rtn(w, bits, group_size, symmetric)
    else:
        dequant, packed, qstate = quantize_bnb(w)
        size, maps = bnb_bytes(packed, qstate)
        shared_maps.update(maps)
        if save_packed:
            packed_state[name] = {'data': packed, 'quant_state': qstate.as_dict(packed=True)}
    dequant = dequant.to(state[name].dtype)
    err, norm = (w - dequant.float()).norm().item(), w.norm().item()
    err_sq, norm_sq = err_sq + err ** 2, norm_sq + norm ** 2
    tensors[name] = {'shape': list(w.shape), 'bytes_before': nbytes(state[name]), 'bytes_after': size,
                     'rel_error': err / norm if norm > 0 else 0.0}
    new_state[name] = dequant
bytes_before = sum(t['bytes_before'] for t in tensors.values())
bytes_after = sum(t['bytes_after'] for t in tensors.values()) + sum(shared_maps.values())
model_bytes_before = sum(map(nbytes, state.values()))
settings = ({'bits': bits, 'group_size': group_size, 'symmetric': symmetric} if method == 'rtn'
            else {'blocksize': blocksize, 'double_quant': double_quant})
record = {
    'method': method, **settings, 'source': original.get('hf_source') or os.path.abspath(init_from),
    'quantize_embeddings': quantize_embeddings, 'quantize_head': quantize_head, 'tensors': tensors,
    'bytes_before': bytes_before, 'bytes_after': bytes_after, 'shared_map_bytes': sum(shared_maps.values()),
    'model_bytes_before': model_bytes_before, 'model_bytes_after': model_bytes_before - bytes_before + bytes_after,
    'rel_error': (err_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0, 'seconds': time.time() - t0,
    'code_version': code_version(),
}

# save -------------------------------------------------------------------------
checkpoint = {k: v for k, v in original.items() if k not in ('optimizer', 'format_version')}
checkpoint.update(model=new_state, quantization=record)
if save_packed:
    checkpoint['quantized_state'] = packed_state
save_checkpoint(checkpoint, ckpt_path)
write_json(record, record_path)
desc = ', '.join(f'{k}={v}' for k, v in settings.items())
print(f"{method} ({desc}) on {len(tensors)} tensors: {bytes_before / 2**20:.2f} MiB -> {bytes_after / 2**20:.3f} MiB "
      f"({bytes_before / bytes_after:.2f}x); whole model {model_bytes_before / 2**20:.2f} MiB -> "
      f"{record['model_bytes_after'] / 2**20:.2f} MiB")
worst = max(tensors, key=lambda n: tensors[n]['rel_error'])
print(f"relative reconstruction error ||W - Q(W)|| / ||W||: {record['rel_error']:.4f} overall, "
      f"worst {tensors[worst]['rel_error']:.4f} ({worst})")
print(f"wrote {ckpt_path} (dequantized weights) in {record['seconds']:.1f} s")
