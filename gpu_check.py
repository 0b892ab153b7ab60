"""
The GPU check: correctness on CUDA and speed at the paper's three sizes, one run of a few minutes on one GPU.

    python gpu_check.py                                  # the first CUDA device -> gpu_check.json
    python gpu_check.py --device=cpu --tiny=True --compile_backend=aot_eager --out=/tmp/check.json   # CI: stays alive

Checks (each with its numbers and `passed` in the JSON; the exit status is 1 if one fails):
  sam_bf16  SAM steps under bf16 autocast against the same steps in float32, from the same weights on the same batches:
            the losses agree to a relative `bf16_tolerance`, nothing is skipped, and the perturbed loss is higher.
  resume    training interrupted after half its steps (model, optimizer and RNG states through torch.save, as a
            checkpoint holds them) and resumed into a fresh model ends bit for bit where the uninterrupted run ends
            (deterministic algorithms on; a second uninterrupted run is the control).
Speed, per size (configs/adamw_{20m,60m,150m}.py: shape, micro-batch and context) and optimizer (AdamW, SAM), as
pretrain.py trains on a GPU (fused AdamW, bf16 autocast, torch.compile): tokens/s, model TFLOP/s, MFU (training.py's
PEAK_FLOPS), step time, peak memory; SAM / AdamW step time and SAM's extra memory / parameter bytes.
"""
import io
import json
import os
import platform
import runpy
import statistics
import sys
import time

os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS, for the resume check

import torch  # noqa: E402

import keys  # noqa: E402
from checkpoint import write_json  # noqa: E402
from config import check, config_defaults, load_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sam import SAM  # noqa: E402
from training import adamw, autocast_context, peak_flops, read_stats, setup_device, train_step  # noqa: E402

# -----------------------------------------------------------------------------
out = 'gpu_check.json'
device = 'cuda'
sizes = ('20m', '60m', '150m')
tiny = False  # a 1-layer model instead of the sizes (CI, on a CPU)
batch_size = 0  # sequences per step; 0 = each size's configured micro-batch (32)
steps = 10  # timed steps per size and optimizer
warmup_steps = 3  # untimed (compilation happens here)
compile = True
compile_backend = 'inductor'
check_steps = 6  # steps of the correctness checks (on the 20M shape; tiny: the tiny one)
bf16_tolerance = 0.02  # relative difference of the losses, bf16 autocast vs float32
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.GPU_CHECK)
globals().update(config)
check(all(s in ('20m', '60m', '150m') for s in sizes), f"sizes must be among '20m', '60m', '150m', got {sizes!r}")
check(steps > 0 and warmup_steps >= 0 and check_steps >= 2 and batch_size >= 0, "steps, check_steps (>= 2) must be "
      "positive, warmup_steps and batch_size >= 0")
_, _, _, device = setup_device(device)
REPO = os.path.dirname(os.path.abspath(__file__))
start_time = time.time()


def shape_of(size):
    """(GPTConfig, micro-batch) of configs/adamw_<size>.py; the vocabulary is GPTConfig's default (dolma2's, padded)."""
    if tiny:
        return GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32), batch_size or 4
    c = runpy.run_path(os.path.join(REPO, 'configs', f'adamw_{size}.py'))
    return (GPTConfig(block_size=c['block_size'], n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd']),
            batch_size or c['batch_size'])


def batches(shape, batch, n, generator_seed):
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randint(0, shape.vocab_size, (n, batch, shape.block_size + 1), generator=g)
    return [[(b[:, :-1].to(device), b[:, 1:].to(device), None)] for b in x]


def synchronize():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def new_run(shape, use_sam):
    torch.manual_seed(seed)
    model = GPT(shape).to(device)
    optimizer = adamw(model.param_groups(0.1), device, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    return model, optimizer, SAM(optimizer, rho=0.05) if use_sam else None


def train(model, optimizer, sam, data, dtype, step_model=None):
    """Stats of train_step on each batch of data, read at the end (one sync, as at a log step)."""
    step_model = model if step_model is None else step_model
    return read_stats([train_step(step_model, optimizer, b, autocast_context(device, dtype), 1.0, sam) for b in data])


def check_sam_bf16():
    shape, batch = shape_of(sizes[0])
    data = batches(shape, batch, check_steps, seed)
    runs = {dtype: train(*new_run(shape, True), data, dtype) for dtype in ('float32', 'bfloat16')}
    diffs = [abs(b['loss'] - f['loss']) / abs(f['loss']) for f, b in zip(runs['float32'], runs['bfloat16'])]
    uphill = sum(s['sam_loss'] > s['loss'] for s in runs['bfloat16'])
    return {'max_relative_loss_difference': max(diffs), 'float32_losses': [s['loss'] for s in runs['float32']],
            'bfloat16_losses': [s['loss'] for s in runs['bfloat16']], 'perturbed_loss_higher': uphill,
            'passed': max(diffs) <= bf16_tolerance and uphill == len(data)
            and not any(s['sam_skipped'] for s in runs['bfloat16'])}


def check_resume():
    """AdamW and SAM steps alternate, as a SAM window in pretrain.py would; bf16 autocast where the device has it."""
    shape, batch = shape_of(sizes[0])
    data = batches(shape, batch, check_steps, seed + 1)
    dtype = 'bfloat16' if device.startswith('cuda') else 'float32'
    half = check_steps // 2
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        def straight():
            model, optimizer, sam = new_run(shape, True)
            for i, b in enumerate(data):
                train(model, optimizer, sam if i % 2 else None, [b], dtype)
            return model
        reference, control = straight(), straight()
        model, optimizer, sam = new_run(shape, True)
        for i, b in enumerate(data[:half]):
            train(model, optimizer, sam if i % 2 else None, [b], dtype)
        buffer = io.BytesIO()
        torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'rng': torch.get_rng_state(),
                    'cuda_rng': torch.cuda.get_rng_state() if device.startswith('cuda') else None}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, map_location=device, weights_only=False)
        model, optimizer, sam = new_run(shape, True)  # fresh objects, as in a new process
        model.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        torch.set_rng_state(saved['rng'])
        if saved['cuda_rng'] is not None:
            torch.cuda.set_rng_state(saved['cuda_rng'].cpu())
        for i, b in enumerate(data[half:], half):
            train(model, optimizer, sam if i % 2 else None, [b], dtype)
    finally:
        torch.use_deterministic_algorithms(False)

    def max_diff(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    bitwise = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    control = all(torch.equal(p, q) for p, q in zip(control.parameters(), reference.parameters()))
    return {'bitwise_equal': bitwise, 'max_abs_difference': max_diff(model, reference),
            'control_bitwise_equal': control, 'dtype': dtype, 'passed': bitwise}


def measure(size):
    shape, batch = shape_of(size)
    data = batches(shape, batch, 2, seed)
    result = {'n_layer': shape.n_layer, 'n_embd': shape.n_embd, 'block_size': shape.block_size, 'batch_size': batch}
    for name in ('adamw', 'sam'):
        model, optimizer, sam = new_run(shape, name == 'sam')
        if name == 'adamw':
            result['parameters'], _ = model.num_params()
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        step_model = torch.compile(model, backend=compile_backend) if compile else model
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats(device)
        compile_start = time.time()
        for i in range(warmup_steps):
            train(model, optimizer, sam, [data[i % 2]], 'bfloat16', step_model)
        synchronize()
        warmup_s = time.time() - compile_start
        times = []
        for i in range(steps):
            step_start = time.perf_counter()
            train_step(step_model, optimizer, data[i % 2], autocast_context(device, 'bfloat16'), 1.0, sam)
            synchronize()
            times.append(time.perf_counter() - step_start)
        step_s = statistics.median(times)
        tokens_per_s = batch * shape.block_size / step_s
        flops = tokens_per_s * model.flops_per_token() * (2 if sam else 1)
        peak = peak_flops(device)
        result[name] = {'step_s': step_s, 'tokens_per_s': tokens_per_s, 'tflops': flops / 1e12,
                        'mfu': flops / peak if peak else None, 'warmup_s': warmup_s,
                        'peak_memory_bytes': torch.cuda.max_memory_allocated(device) if device.startswith('cuda')
                        else None}
        del model, optimizer, sam, step_model
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
        if compile:
            torch._dynamo.reset()
    result['sam_adamw_step_time'] = result['sam']['step_s'] / result['adamw']['step_s']
    if device.startswith('cuda'):
        result['sam_extra_memory_per_parameter_byte'] = (result['sam']['peak_memory_bytes'] -
                                                         result['adamw']['peak_memory_bytes']) / param_bytes
    return result


report = {'device': torch.cuda.get_device_name(device) if device.startswith('cuda') else platform.processor() or 'cpu',
          'torch': torch.__version__, 'peak_bf16_flops': peak_flops(device), 'config': config,
          'checks': {}, 'sizes': {}}
for name, run_check in (('sam_bf16', check_sam_bf16), ('resume', check_resume)):
    report['checks'][name] = run_check()
    print(f"check {name}: {'passed' if report['checks'][name]['passed'] else 'FAILED'} {report['checks'][name]}")
    write_json(report, out)
for size in (('tiny',) if tiny else sizes):
    report['sizes'][size] = measure(size)
    r = report['sizes'][size]
    print(f"{size}: AdamW {r['adamw']['tokens_per_s']:,.0f} tokens/s (MFU {r['adamw']['mfu']}), SAM / AdamW step time "
          f"{r['sam_adamw_step_time']:.3f}, SAM extra memory {r.get('sam_extra_memory_per_parameter_byte')}")
    write_json(report, out)
report['seconds'] = time.time() - start_time
write_json(report, out)
print(f"wrote {out} ({report['seconds']:.0f} s)")
sys.exit(0 if all(c['passed'] for c in report['checks'].values()) else 1)
