"""
What pretrain.py and finetune.py share: process setup (single, or DDP under torchrun; host memory kept for reuse),
the learning-rate schedules, one optimizer step (AdamW or SAM, with gradient accumulation) whose stats stay on the
device until a log step reads them, the log lines and throughput (tokens/s, MFU), the validation loss; and the
tensor-memory tracker that benchmark.py and memory_budget.py measure with.
"""
import contextlib
import ctypes
import math
import os
import sys
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from config import check, fail


def keep_freed_memory():
    """Let glibc's malloc keep freed host memory for reuse instead of unmapping it. By default a block above 128 kB
    (the bound rises to 32 MB as such blocks are freed) is mapped fresh and unmapped when freed, so each CPU training
    step page-faults its largest tensors (logits and their gradient) in anew: 11% of an eager step at cpu_small's
    shape (docs/speed.md). Results are unchanged; the process keeps up to 1 GiB of freed memory. No-op without glibc."""
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None) if sys.platform.startswith('linux') else None
    if mallopt is not None:
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free memory at the top of the heap
        if not mallopt(-3, 1 << 30):  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap, not fresh mappings
            mallopt(-3, 32 << 20)  # where a glibc refuses that bound: its own adaptive maximum


def setup_device(device):
    """Returns (ddp, rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    keep_freed_memory()
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but no CUDA device is available (use --device=cpu)")
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        fail(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0, ...)")
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if not ddp:
        return False, 0, 1, device
    rank, world_size, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, world_size, device


def setup_run(device, dtype, gradient_accumulation_steps, seed):
    """The start every training script shares: device (and DDP), micro-steps per process, precision, seeding.
    Returns (ddp, rank, world_size, device, local_accum, dtype, autocast)."""
    ddp, rank, world_size, device = setup_device(device)
    check(gradient_accumulation_steps % world_size == 0, f"gradient_accumulation_steps ({gradient_accumulation_steps}) "
          f"must be divisible by the number of processes ({world_size})")
    dtype = resolve_dtype(dtype, device)
    torch.manual_seed(seed + rank)
    return ddp, rank, world_size, device, gradient_accumulation_steps // world_size, dtype, autocast_context(device, dtype)


def autocast_context(device, dtype):
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type='cuda' if device.startswith('cuda') else 'cpu', dtype=torch.bfloat16)


def resolve_dtype(dtype, device):
    """'auto' is bfloat16 where the device supports it (the paper's setting), else float32."""
    if dtype == 'auto':
        return 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    return dtype


def lr_at(it, learning_rate, max_iters, warmup_iters, lr_schedule, anneal_fraction=1.0, min_lr_ratio=0.1):
    """Linear warmup, then
    cosine:   cosine decay to min_lr_ratio * peak at max_iters;
    wsd:      constant peak, then linear decay to min_lr_ratio * peak over the final anneal_fraction of steps
              (never starting before warmup ends);
    constant: the peak.
    Values are those at the start of step `it` (0-based); the minimum is reached at it = max_iters, so the
    last step taken (max_iters - 1) sits one decay increment above it, as in nanoGPT and OLMo."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    min_lr = min_lr_ratio * learning_rate
    if lr_schedule == 'constant':
        return learning_rate
    if lr_schedule == 'cosine':
        progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (learning_rate - min_lr)
    if lr_schedule == 'wsd':
        anneal_start = max(warmup_iters, max_iters - round(anneal_fraction * max_iters))
        if it < anneal_start:
            return learning_rate
        progress = (it - anneal_start) / max(1, max_iters - anneal_start)
        return learning_rate - min(progress, 1.0) * (learning_rate - min_lr)
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}")


def adamw(param_groups, device, **hyperparameters):
    """torch's AdamW: fused on CUDA (one kernel, and it skips a bad step on the device), foreach elsewhere (on the CPU,
    the numerics every CPU result here was measured with)."""
    fused = device.startswith('cuda')
    return torch.optim.AdamW(param_groups, fused=fused, foreach=not fused, **hyperparameters)


def forward_backward(model, micro_batches, autocast, z_loss=0.0):
    """Forward/backward over micro_batches [(x, y, loss_mask or None), ...], the gradients of the mean loss summed into
    .grad; under DDP only the last micro-batch all-reduces. Returns the mean loss, a 0-dim tensor on the device."""
    total = 0.0
    for i, (x, y, mask) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x, y, loss_mask=mask, z_loss=z_loss, loss_only=True)
            (loss / len(micro_batches)).backward()
        total += loss.detach()
    return total / len(micro_batches)


def sam_forward_backward(model, sam, micro_batches, autocast, z_loss=0.0):
    """SAM's two passes (Foret et al. 2021): the gradient g at w, a move to w + e with e = rho g / ||g||, the gradient
    there, and back to exactly w, so that the optimizer step applies the gradient at w + e to w. The ascent gradient
    stays local to each DDP rank unless sam.sync_ascent (the paper's m-sharpness). Returns 0-dim device tensors:
    loss (at w), sam_loss (at w + e), ascent_grad_norm and sam_skipped (a non-finite ascent norm: no move)."""
    with sam.ascent_context(model):
        loss = forward_backward(model, micro_batches, autocast, z_loss)
    ascent_grad_norm = sam.first_step()  # w -> w + e
    sam.zero_grad(set_to_none=True)
    sam_loss = forward_backward(model, micro_batches, autocast, z_loss)  # the gradient the optimizer applies
    sam.restore()  # back to w
    return {'loss': loss, 'sam_loss': sam_loss, 'ascent_grad_norm': ascent_grad_norm,
            'sam_skipped': ~torch.isfinite(ascent_grad_norm)}


def optimizer_step(model, optimizer, grad_clip, loss):
    """Clip the gradient and step, unless the loss or the gradient norm is not finite (a bad step: weights and optimizer
    state stay as they were); then zero the gradients. Returns the norm before clipping, a 0-dim device tensor.

    Fused AdamW (the CUDA default) takes that verdict on the device, through found_inf as under a GradScaler, so the
    step never waits for the host; other optimizers read it, which costs nothing on a CPU. Under DDP the all-reduced
    gradient norm is the same on every rank, and a non-finite loss on any rank makes it non-finite: all ranks agree."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if optimizer.defaults.get('fused'):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif finite.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def msam_forward_backward(model, sam, micro_batches, autocast, z_loss=0.0):
    """Momentum-SAM (Becker et al. 2024): one pass, at w - rho m / ||m|| (m: AdamW's exp_avg, the same on every DDP
    rank), then back to exactly w. Returns 0-dim device tensors: loss (there) and momentum_norm."""
    momentum_norm = sam.first_step_along_momentum()
    loss = forward_backward(model, micro_batches, autocast, z_loss)
    sam.restore()
    return {'loss': loss, 'momentum_norm': torch.as_tensor(momentum_norm)}


def train_step(model, optimizer, micro_batches, autocast, grad_clip, sam=None, z_loss=0.0, along_momentum=False,
               adjust_grad=None):
    """One optimizer step on micro_batches, with SAM's two passes when sam is given (Momentum-SAM's one pass with
    along_momentum). Returns its stats as 0-dim device tensors (read_stats turns them into numbers): loss, grad_norm
    (before clipping) and, with SAM, those of sam_forward_backward. adjust_grad(), if given, changes the accumulated
    gradient before clipping (finetune.py's l2_init; LookSAM's kept component between SAM steps)."""
    if sam is None:
        stats = {'loss': forward_backward(model, micro_batches, autocast, z_loss)}
    elif along_momentum:
        stats = msam_forward_backward(model, sam, micro_batches, autocast, z_loss)
    else:
        stats = sam_forward_backward(model, sam, micro_batches, autocast, z_loss)
    if adjust_grad is not None:
        adjust_grad()
    stats['grad_norm'] = optimizer_step(model, optimizer, grad_clip, stats['loss'])
    return stats


def read_stats(steps_stats):
    """[train_step's stats, ...] -> the same dicts holding Python numbers, read in one host-device sync."""
    if not steps_stats:
        return []
    values = iter(torch.stack([v.double() for stats in steps_stats for v in stats.values()]).tolist())
    return [{k: bool(next(values)) if v.dtype == torch.bool else next(values) for k, v in stats.items()}
            for stats in steps_stats]


def read_steps(pending, tokens_per_iter, bad_steps):
    """pending: [(iteration, lr, train_step's stats)] -> (log records of these steps, the run's bad-step count after
    them). A bad step (non-finite loss or gradient norm: the optimizer did not step) has bad_step and bad_steps."""
    records = []
    for (it, lr, _), stats in zip(pending, read_stats([stats for _, _, stats in pending])):
        record = {'iter': it + 1, 'tokens': (it + 1) * tokens_per_iter, 'lr': lr, **stats}
        if not (math.isfinite(stats['loss']) and math.isfinite(stats['grad_norm'])):
            bad_steps += 1
            record.update(bad_step=True, bad_steps=bad_steps)
        records.append(record)
    return records, bad_steps


def too_many_bad_steps(records, max_bad_steps):
    """The error for the first of records whose bad step was one too many."""
    r = next(r for r in records if r.get('bad_steps', 0) > max_bad_steps)
    return (f"non-finite loss ({r['loss']}) or gradient norm ({r['grad_norm']}) at iter {r['iter'] - 1} (bad step "
            f"{r['bad_steps']}, max_bad_steps={max_bad_steps}); the optimizer did not step")


def log_steps(records, log, progress):
    """log(record) for the log lines among records: those with a speed (the log_interval-th iterations), bad steps
    and SAM steps that skipped their perturbation; say on the console what was skipped."""
    for r in records:
        if r.get('sam_skipped'):
            progress.write(f"iter {r['iter'] - 1}: SAM ascent gradient norm is {r['ascent_grad_norm']}; "
                           f"perturbation skipped")
        if r.get('bad_step'):
            progress.write(f"iter {r['iter'] - 1}: non-finite loss or gradient norm; step skipped "
                           f"(bad step {r['bad_steps']})")
        if 'tokens_per_s' in r or r.get('bad_step') or r.get('sam_skipped'):
            log(r)
        if 'tokens_per_s' in r:
            progress.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}")


# dense bf16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name (MFU is logged on these only)
PEAK_FLOPS = {'A100': 312e12, 'H100 80GB HBM3': 989e12, 'H100 SXM': 989e12, 'H200': 989e12}


def peak_flops(device):
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def throughput(tokens_per_iter, flops_per_token, device, world_size, iter_num):
    """speed(iter_num, passes): tokens/s, model TFLOP/s and (on a GPU of PEAK_FLOPS) MFU since its previous call (or
    iteration iter_num), counting `passes` forward/backward passes per step (SAM: 2), all processes together."""
    peak, last = peak_flops(device), [time.time(), iter_num]

    def speed(iter_num, passes):
        now = time.time()
        tokens_per_s = (iter_num - last[1]) * tokens_per_iter / max(now - last[0], 1e-9)
        flops = tokens_per_s * passes * flops_per_token
        last[:] = [now, iter_num]
        return {'tokens_per_s': tokens_per_s, 'tflops': flops / 1e12,
                **({'mfu': flops / (peak * world_size)} if peak else {})}
    return speed


@torch.no_grad()
def estimate_loss(model, get_batch, n_batches, autocast, rank=0, world_size=1):
    """Mean loss per trained token over the fixed batches get_batch(0..n_batches-1), split across DDP ranks
    (a batch counts by its number of loss_mask tokens, so packed chat data is weighted like one long text)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(rank, n_batches, world_size):
        x, y, mask = get_batch(i)
        n = y.numel() if mask is None else int(mask.sum())
        if n == 0:  # nothing trained in this batch: the model would report 0
            continue
        with autocast:
            _, loss = model(x, y, loss_mask=mask)
        loss_sum, count = loss_sum + loss.item() * n, count + n
    model.train(was_training)
    if world_size > 1:
        total = torch.tensor([loss_sum, count], dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(total)
        loss_sum, count = total.tolist()
    return loss_sum / max(count, 1)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (on any device), freed storage subtracted."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return

        def release(_, key=key, size=size):
            self.live.pop(key, None)
            self.current -= size
        self.live[key] = weakref.ref(storage, release)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out
