"""
Per-GPU memory of SAM mid-training of OLMo-2-1B (configs/olmo2_1b_mid_sam.py) under plain DDP, and whether it fits.

    python memory_budget.py                          # micro-batches 2, 4, 8 of 2048 tokens, bf16 autocast
    python memory_budget.py --gpu_gib=39.4           # a 40 GB A100

Model state is counted from what pretrain.py keeps per parameter; the memory one SAM step creates is measured on
scaled-down models on the CPU and extrapolated to the 1B shape. The method and its limits: docs/olmo2.md.
"""
import sys

import keys
import torch

from config import config_defaults, load_config
from model import GPT, GPTConfig
from sam import SAM
from training import PeakTensorMemory, autocast_context, train_step

# -----------------------------------------------------------------------------
# the 1B model (OLMo-2-0425-1B) and its mid-training micro-batch
n_layer = 16
n_head = 16
n_embd = 2048
intermediate_size = 8192
vocab_size = 100352
block_size = 2048
batch_sizes = (2, 4, 8)  # sequences per GPU per micro-step
gpu_gib = 79.6  # an '80 GB' H100 reports 81,559 MiB
# the scaled-down measurement models
measure_widths = (128, 256)
measure_heads = 4
measure_block = 256
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.MEMORY_BUDGET)
globals().update(config)
keys.check_model_shape(n_embd, n_head)
for width in measure_widths:
    keys.check_model_shape(width, measure_heads)
GIB = 2 ** 30


def shape(layers, width, heads=None, inter=None):
    return GPTConfig(block_size=max(block_size, measure_block), vocab_size=vocab_size, n_layer=layers, n_embd=width,
                     n_head=heads or measure_heads, intermediate_size=inter or 4 * width, qk_norm=True,
                     norm_position='post', rope_theta=5e5)


def peak_of_one_step(layers, width, sequences):
    """(bytes created and live at the peak of one SAM step after a warm-up step, parameter count)."""
    torch.manual_seed(seed)
    model = GPT(shape(layers, width))
    base = torch.optim.AdamW(model.param_groups(0.1, decay_embeddings=False), lr=1e-4, foreach=True)
    sam = SAM(base, rho=0.05)
    x = torch.randint(0, vocab_size, (sequences, measure_block))
    batch = [(x, x.roll(-1, 1), None)] * 2  # two micro-steps: the second one's forward runs with the gradients live
    autocast = autocast_context('cpu', 'bfloat16')
    train_step(model, base, batch, autocast, 1.0, sam, 1e-5)  # AdamW moments and SAM's buffer now exist
    tracker = PeakTensorMemory()
    with tracker:
        train_step(model, base, batch, autocast, 1.0, sam, 1e-5)
    return tracker.peak, sum(p.numel() for p in model.parameters())


fits = {}
for width in measure_widths:
    a, p1 = peak_of_one_step(1, width, 1)
    b, p2 = peak_of_one_step(2, width, 1)
    c, _ = peak_of_one_step(1, width, 2)
    tokens = measure_block
    k = (2 * a - c) / p1  # c - a is one more sequence's tokens, so 2a - c is the parameter-proportional part
    per_layer = (b - a - k * (p2 - p1)) / tokens
    head = (c - a) / tokens - per_layer
    fits[width] = (k, per_layer, head)
    print(f"measured at width {width}: k = {k:.2f} bytes/param, per layer {per_layer / 1024:.2f} KiB/token, "
          f"head {head / 1024:.1f} KiB/token  (peaks {a / GIB:.3f}, {b / GIB:.3f}, {c / GIB:.3f} GiB)")
(w1, (k1, l1, h1)), (w2, (k2, l2, h2)) = fits.items()


def at_width(v1, v2, width):  # linear in the width through the two measurements
    return v1 + (v2 - v1) * (width - w1) / (w2 - w1)


per_layer, head, k = at_width(l1, l2, n_embd), at_width(h1, h2, n_embd), max(k1, k2)
print(f"per-layer activations {l2 / l1:.3f}x from width {w1} to {w2} (linear in width predicts {w2 / w1:.3f}x)")
with torch.device('meta'):
    params = sum(p.numel() for p in GPT(shape(n_layer, n_embd, n_head, intermediate_size)).parameters())
print(f"\nOLMo-2-1B shape: {params:,} parameters ({params / 1e9:.3f}B); SAM over AdamW, plain DDP, bf16 autocast")
rows = [('float32 weights', 4 * params), ('AdamW exp_avg + exp_avg_sq (float32)', 8 * params),
        ("SAM's saved weights", 4 * params), ("DDP gradient buckets (a second gradient copy)", 4 * params),
        (f"float32 gradients + autocast bf16 weight copies etc. (measured: {k:.2f} B/param)", k * params)]
print(f"| {'what':<82} | {'GiB':>6} |\n|{'-' * 84}|{'-' * 8}|")
for name, nbytes in rows:
    print(f"| {name:<82} | {nbytes / GIB:6.1f} |")
state = sum(n for _, n in rows)
for sequences in batch_sizes:
    tokens = sequences * block_size
    act = tokens * (head + n_layer * per_layer)
    total = state + act
    parts = f"layers {n_layer * per_layer * tokens / GIB:.1f}, logits/loss {head * tokens / GIB:.1f}"
    print(f"| {f'activations at {sequences} x {block_size} ({parts})':<82} | {act / GIB:6.1f} |")
    fits_gpu = 'fits' if total < gpu_gib * GIB else 'does NOT fit'
    name = f'total at micro-batch {sequences} x {block_size}: {fits_gpu} in {gpu_gib:g} GiB'
    print(f"| {name:<82} | {total / GIB:6.1f} |")
