"""
Training speed on this machine, at the CPU presets' shapes (docs/speed.md has the measured numbers).

    python benchmark.py                                    # both parts below (a few minutes on 2 cores)
    python benchmark.py --sam=False --threads=1            # only part 1, on one thread (as the experiment's jobs run)
    python benchmark.py --reference=False --sam=False --experiment=True   # only part 3 (about 18 minutes on 2 cores)

1. pretrain.py's model (model.py, OLMo style) against a GPT-2-style reference written the straightforward way (below:
   LayerNorm, GELU MLP, learned positions, tied head, eager torch.nn), AdamW steps through training.train_step at
   configs/cpu_small.py's shape and batch: eager float32, torch.compile (cpu_small's setting), and bf16 autocast; the
   reference eager (the issue's yardstick) and compiled (nanoGPT's own default).
   The models take turns, `steps` steps each per round; each ratio is a median over rounds of per-round ratios, so a
   machine whose speed drifts (a shared one) moves both sides of a ratio alike. Compilation's one-time cost is printed.
2. SAM's cost over AdamW at every CPU preset's shape, as the preset runs it (configs/cpu_small.py eager, and compiled as
   the default experiment runs it; configs/cpu_adamw.py; the model of configs/experiments/cpu_regime.py, compiled):
   step-time ratio (targets <= 2.05: two forward/backward passes) and SAM's extra peak memory over AdamW / parameter
   bytes (target <= 1.0: one copy of the weights), counted by a tracker of live tensor storage (training.PeakTensorMemory).
3. (--experiment=True) the default experiment from scratch, `python experiment.py` into a temporary out_dir: its wall
   time and its stages' time by kind. Run it on an otherwise idle machine: it is the time a newcomer waits.
"""
import contextlib
import os
import runpy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import keys
from config import parse_value, config_defaults, load_config
from model import GPT, GPTConfig
from sam import SAM
from training import PeakTensorMemory, autocast_context, keep_freed_memory, train_step

# -----------------------------------------------------------------------------
reference = True  # part 1
sam = True  # part 2
rounds = 5
steps = 8  # per model and round
warmup_steps = 3  # untimed, per model (compilation happens here)
threads = 0  # torch threads; 0 = torch's default (the number of cores)
experiment = False  # part 3: time the default experiment (minutes, not seconds: off unless asked)
seed = 1337
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.BENCHMARK)
globals().update(config)
if threads:
    torch.set_num_threads(threads)
keep_freed_memory()  # as pretrain.py does (training.setup_device); both models get it
REPO = os.path.dirname(os.path.abspath(__file__))


class ReferenceGPT(nn.Module):
    """GPT-2 as nanoGPT writes it (bias=False, no dropout): the yardstick for model.py's speed."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            'ln_1': nn.LayerNorm(n_embd, bias=False), 'c_attn': nn.Linear(n_embd, 3 * n_embd, bias=False),
            'attn_proj': nn.Linear(n_embd, n_embd, bias=False), 'ln_2': nn.LayerNorm(n_embd, bias=False),
            'c_fc': nn.Linear(n_embd, 4 * n_embd, bias=False), 'mlp_proj': nn.Linear(4 * n_embd, n_embd, bias=False),
        }) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5 if name.endswith('proj.weight') else 0.02)

    def forward(self, idx, targets, loss_mask=None, z_loss=0.0, loss_only=False):  # train_step's call; unused here
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b['c_attn'](b['ln_1'](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, -1)
            x = x + b['attn_proj'](y)
            x = x + b['mlp_proj'](F.gelu(b['c_fc'](b['ln_2'](x))))
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def experiment_model(path):
    """preset() of an experiment config's `_model` command line (a config file and --key=value overrides)."""
    config_file, *overrides = runpy.run_path(os.path.join(REPO, path))['_model'].split()
    return preset(config_file, **{k: parse_value(v) for k, _, v in (o[2:].partition('=') for o in overrides)})


def preset(path, **overrides):
    """The model shape and batch of a config file (pretrain.py's defaults where it says nothing)."""
    c = {'n_head': 8, 'vocab_size': 0, 'gradient_accumulation_steps': 1, 'compile': False,
         **runpy.run_path(os.path.join(REPO, path)), **overrides}
    vocab = c['vocab_size'] or {'wiki_en_1k': 1024, 'wiki_en': 4096}[c['dataset']]  # as prepared by their configs
    return dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                vocab_size=vocab, batch_size=c['batch_size'], accum=c['gradient_accumulation_steps'],
                compile=c['compile'])


class Trainer:
    """One model, its optimizer (and SAM) and fixed random batches; run(n) takes n training steps, returns seconds."""

    def __init__(self, shape, kind='olmo', compile=False, dtype='float32', use_sam=False):
        torch.manual_seed(seed)
        model_shape = {k: shape[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')}
        self.model = GPT(GPTConfig(**model_shape)) if kind == 'olmo' else ReferenceGPT(**model_shape)
        groups = (self.model.param_groups(0.1) if kind == 'olmo' else
                  [{'params': [p for p in self.model.parameters() if p.dim() >= 2], 'weight_decay': 0.1},
                   {'params': [p for p in self.model.parameters() if p.dim() < 2], 'weight_decay': 0.0}])
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True)  # pretrain.py's on a CPU
        self.sam = SAM(self.optimizer, rho=0.05) if use_sam else None
        self.step_model = torch.compile(self.model) if compile else self.model
        self.autocast = autocast_context('cpu', dtype)
        x = torch.randint(0, shape['vocab_size'], (shape['accum'], shape['batch_size'], shape['block_size']))
        self.batches = [(xb, xb.roll(-1, 1), None) for xb in x]
        self.tokens_per_step = x.numel()

    def run(self, n):
        start = time.perf_counter()
        for _ in range(n):
            train_step(self.step_model, self.optimizer, self.batches, self.autocast, 1.0, self.sam)
        return time.perf_counter() - start


def interleaved(trainers):
    """{name: [seconds per step in each round]}: every trainer takes `steps` steps in turn, `rounds` times."""
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            times[name].append(trainer.run(steps) / steps)
    return times


def warm_up(trainers):
    """{name: seconds of the untimed first steps beyond their steady-state time: compilation's one-time cost}"""
    first = {name: t.run(warmup_steps) for name, t in trainers.items()}
    steady = {name: t.run(steps) / steps for name, t in trainers.items()}
    return {name: first[name] - warmup_steps * steady[name] for name in trainers}


def median_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


print(f"benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
      f"{rounds} rounds x {steps} steps")
if reference:
    shape = preset('configs/cpu_small.py')
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    variants = {'reference': ('gpt2', False, 'float32'), 'reference compiled': ('gpt2', True, 'float32'),
                'olmo': ('olmo', False, 'float32'), 'olmo compiled': ('olmo', True, 'float32'),
                **({'olmo bf16': ('olmo', False, 'bfloat16'), 'olmo compiled bf16': ('olmo', True, 'bfloat16')}
                   if bf16 else {})}
    trainers = {name: Trainer(shape, kind, compile, dtype) for name, (kind, compile, dtype) in variants.items()}
    one_time = warm_up(trainers)
    times = interleaved(trainers)
    print(f"\n1. pretrain.py's model vs a GPT-2-style reference (eager float32), AdamW steps at cpu_small's shape "
          f"({shape['n_layer']} x {shape['n_embd']}, vocab {shape['vocab_size']}, context {shape['block_size']}, "
          f"batch {shape['batch_size']})")
    for name, t in times.items():
        model = trainers[name].model
        n = sum(p.numel() for p in model.parameters())
        flops = f", {model.flops_per_token() / 1e6:.2f} MFLOP/token" if isinstance(model, GPT) else ''
        compiled = f", compile once: {one_time[name]:.1f} s" if variants[name][1] else ''
        print(f"  {name:20s} {trainers[name].tokens_per_step / statistics.median(t):9,.0f} tokens/s  "
              f"ratio to reference {median_ratio(times['reference'], t):.3f}, to the compiled reference "
              f"{median_ratio(times['reference compiled'], t):.3f}  ({n / 1e3:.0f}k parameters{flops}"
              f"{compiled})")
    if not bf16:
        print("  (no bf16 rows: this CPU lacks native bf16 support, avx512_bf16 or AMX)")

if sam:
    print("\n2. SAM / AdamW at each CPU preset's shape, as the preset runs it")
    presets = {'cpu_small': preset('configs/cpu_small.py'),
               'cpu_small, the experiment': preset('configs/cpu_small.py', compile=True),  # its pretrain_args
               'cpu_adamw': preset('configs/cpu_adamw.py'),
               'cpu_regime': experiment_model('configs/experiments/cpu_regime.py')}
    for name, shape in presets.items():
        trainers = {s: Trainer(shape, compile=shape['compile'], use_sam=s == 'sam') for s in ('adamw', 'sam')}
        warm_up(trainers)
        times = interleaved(trainers)
        peaks = {}
        for s in ('adamw', 'sam'):  # from a fresh start, so AdamW's moments and SAM's copy of w are counted
            trainer, tracker = Trainer(shape, use_sam=s == 'sam'), PeakTensorMemory()  # eager: every tensor is seen
            with tracker:
                trainer.run(2)
            peaks[s] = tracker.peak
        param_bytes = sum(p.numel() * p.element_size() for p in trainers['adamw'].model.parameters())
        print(f"  {name:26s} {shape['n_layer']} x {shape['n_embd']}, vocab {shape['vocab_size']}"
              f"{', compiled' if shape['compile'] else ''}: "
              f"SAM / AdamW step time {median_ratio(times['sam'], times['adamw']):.3f} (target <= 2.05), "
              f"extra memory {(peaks['sam'] - peaks['adamw']) / param_bytes:.3f} x parameter bytes (target <= 1.0)")

if experiment:
    import json
    import subprocess
    import tempfile
    print("\n3. The default experiment from scratch (python experiment.py, a temporary out_dir)")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, 'experiment.py'), f'--out_dir={out}'], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        stage_time = {}
        for root, _, files in os.walk(out):
            if 'stage.json' in files:
                with open(os.path.join(root, 'stage.json')) as f:
                    kind = os.path.relpath(root, out).split(os.sep)[0]
                    stage_time[kind] = stage_time.get(kind, 0.0) + json.load(f).get('wall_s', 0.0)
    print(f"  {wall / 60:.1f} min wall (target <= 8); stage time by kind, summed over stages run side by side: "
          + ', '.join(f'{kind} {seconds:.0f} s' for kind, seconds in sorted(stage_time.items())))
