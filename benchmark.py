"""
Measures what SAM costs over AdamW on this machine, for one model shape (default: the CPU presets').

    python benchmark.py                                   # the CPU presets' shape and batch
    python benchmark.py --n_embd=512 --n_layer=8 --n_head=8 --block_size=1024 --vocab_size=100352 --device=cuda

Prints: AdamW training tokens/s; SAM step time / AdamW step time (two forward/backward passes
make 2.0 the floor); SAM's peak extra memory over AdamW divided by the parameter bytes (SAM's
design target: 1.0, one copy of the weights). On CUDA the peaks come from the caching allocator's
statistics; on the CPU each optimizer runs in its own fresh process and the peak resident set
sizes are compared, so allocator noise enters that figure.
"""
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from config import check_choice, config_defaults, load_config
from model import GPT, GPTConfig
from sam import SAM
from training import autocast_context, resolve_dtype, setup_device, train_step

# -----------------------------------------------------------------------------
n_layer = 4
n_head = 4
n_embd = 128
vocab_size = 4096
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
optimizer = 'both'  # 'both' runs the comparison; 'adamw' / 'sam' measure one optimizer (used for the CPU memory runs)
warmup_steps = 3
steps = 20
device = 'auto'
dtype = 'float32'
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:])
globals().update(config)
check_choice(config, 'optimizer', ('both', 'adamw', 'sam'))


def measure(use_sam):
    """Median step time (s) and peak memory (bytes, CUDA only) of `steps` training steps on random tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd)).to(device)
    base = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    sam = SAM(base, rho=0.05) if use_sam else None
    step_model = torch.compile(model) if compile else model
    autocast = autocast_context(device, resolved_dtype)
    batches = [(x, x.roll(-1, 1), None) for x in
               torch.randint(0, vocab_size, (gradient_accumulation_steps, batch_size, block_size), device=device)]
    times = []
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup_steps + steps):
        start = time.perf_counter()
        train_step(step_model, base, batches, autocast, 1.0, sam)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        if i >= warmup_steps:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith('cuda') else None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return statistics.median(times), peak, param_bytes


_, _, _, device = setup_device(device)
resolved_dtype = resolve_dtype(dtype, device)
if optimizer != 'both':  # a child process of the CPU memory comparison
    step_time, _, param_bytes = measure(optimizer == 'sam')
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({'step_time': step_time, 'peak_rss': rss, 'param_bytes': param_bytes}))
    sys.exit(0)

tokens_per_step = batch_size * gradient_accumulation_steps * block_size
print(f"benchmark: {n_layer} layers, d={n_embd}, vocab {vocab_size}, {tokens_per_step} tokens/step, "
      f"{device}, {resolved_dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
if device.startswith('cuda'):
    adamw_time, adamw_peak, param_bytes = measure(False)
    sam_time, sam_peak, _ = measure(True)
else:
    runs = {}
    for name in ('adamw', 'sam'):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--optimizer={name}'],
                             capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    adamw_time, adamw_peak, param_bytes = runs['adamw']['step_time'], runs['adamw']['peak_rss'], runs['adamw']['param_bytes']
    sam_time, sam_peak = runs['sam']['step_time'], runs['sam']['peak_rss']
print(f"parameters: {param_bytes / 4 / 1e6:.2f}M ({param_bytes / 2**20:.1f} MiB)")
print(f"AdamW: {tokens_per_step / adamw_time:,.0f} tokens/s ({adamw_time * 1e3:.1f} ms/step, median of {steps})")
print(f"SAM:   {tokens_per_step / sam_time:,.0f} tokens/s ({sam_time * 1e3:.1f} ms/step)")
print(f"SAM / AdamW step time: {sam_time / adamw_time:.3f}  (floor 2.0, target <= 2.05)")
print(f"SAM extra peak memory / parameter bytes: {(sam_peak - adamw_peak) / param_bytes:.3f}  (target <= 1.0; "
      f"{'CUDA allocator peaks' if device.startswith('cuda') else 'peak RSS of separate processes'})")
