"""
Measures what SAM costs over AdamW on this machine, for one model shape (default: the CPU presets').

    python benchmark.py                                   # the CPU presets' shape and batch
    python benchmark.py --n_embd=512 --n_layer=8 --n_head=8 --block_size=1024 --vocab_size=100352 --device=cuda

Prints: AdamW training tokens/s; SAM step time / AdamW step time (two forward/backward
passes per step: about 2); SAM's peak extra memory over AdamW divided by the parameter bytes (SAM's
design target: 1.0, one copy of the weights). On CUDA the peaks come from the caching allocator's
statistics; on the CPU a dispatch-mode tracker adds up the bytes of every live tensor storage
(the same accounting, without allocator caching).
"""
import contextlib
import statistics
import sys
import time

import torch

from config import config_defaults, load_config
from model import GPT, GPTConfig
from sam import SAM
from training import PeakTensorMemory, autocast_context, resolve_dtype, setup_device, train_step

# -----------------------------------------------------------------------------
n_layer = 4
n_head = 4
n_embd = 128
vocab_size = 4096
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
warmup_steps = 3
steps = 20
device = 'auto'
dtype = 'float32'
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:])
globals().update(config)


def run(use_sam, n_steps, tracker=contextlib.nullcontext()):
    """Median step time (s) over the last n_steps of warmup_steps + n_steps training steps on random tokens."""
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
    with tracker:
        for i in range(warmup_steps + n_steps):
            start = time.perf_counter()
            train_step(step_model, base, batches, autocast, 1.0, sam)
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            if i >= warmup_steps:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(use_sam):
    """Peak bytes during two steps: the CUDA allocator's statistics, or a tensor-storage tracker on the CPU."""
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run(use_sam, 2)
        return torch.cuda.max_memory_allocated()
    tracker = PeakTensorMemory()
    run(use_sam, 2, tracker)
    return tracker.peak


_, _, _, device = setup_device(device)
resolved_dtype = resolve_dtype(dtype, device)
tokens_per_step = batch_size * gradient_accumulation_steps * block_size
param_bytes = sum(p.numel() * p.element_size() for p in
                  GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd)).parameters())
print(f"benchmark: {n_layer} layers, d={n_embd}, vocab {vocab_size}, {param_bytes / 4 / 1e6:.2f}M parameters, "
      f"{tokens_per_step} tokens/step, {device}, {resolved_dtype}, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads")
adamw_time, sam_time = run(False, steps), run(True, steps)
extra_memory = peak_memory(True) - peak_memory(False)
print(f"AdamW: {tokens_per_step / adamw_time:,.0f} tokens/s ({adamw_time * 1e3:.1f} ms/step, median of {steps})")
print(f"SAM:   {tokens_per_step / sam_time:,.0f} tokens/s ({sam_time * 1e3:.1f} ms/step)")
print(f"SAM / AdamW step time: {sam_time / adamw_time:.3f}  (two forward/backward passes: about 2; target <= 2.05)")
print(f"SAM extra peak memory / parameter bytes: {extra_memory / param_bytes:.3f}  (target <= 1.0)")
