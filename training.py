"""
What pretrain.py and finetune.py share: process setup (single, or DDP under
torchrun), the learning-rate schedules, one optimizer step (AdamW or SAM, with
gradient accumulation), its bookkeeping (log line, progress bar, bad-step guard) and the validation loss; and the
tensor-memory tracker that benchmark.py and
memory_budget.py measure with.
"""
import contextlib
import math
import os
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from checkpoint import append_jsonl
from config import check, fail


def setup_device(device):
    """Returns (ddp, rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device!r} but no CUDA device is available (use --device=cpu)")
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


def _accumulate_gradients(model, micro_batches, autocast, z_loss):
    """Forward/backward over the micro-batches; under DDP only the last one all-reduces. Returns the mean loss."""
    total = 0.0
    for i, (x, y, mask) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x, y, loss_mask=mask, z_loss=z_loss)
            (loss / len(micro_batches)).backward()
        total += loss.detach()
    return total / len(micro_batches)


def train_step(model, optimizer, micro_batches, autocast, grad_clip, sam=None, z_loss=0.0):
    """One optimizer step on micro_batches [(x, y, loss_mask or None), ...].

    With sam: gradient at w over all micro-batches (local to the rank unless sam.sync_ascent),
    move to w + e, gradient there (all-reduced), back to w, clip, step. The returned dict has
    loss (at w), sam_loss (at w + e, SAM only), grad_norm (descent gradient, before clipping),
    ascent_grad_norm (SAM only) and sam_skipped (True when a non-finite ascent norm skipped the move). A step whose
    loss or grad_norm is not finite is a bad step: the optimizer does not step."""
    stats = {}
    if sam is not None:
        with sam.ascent_context(model):
            stats['loss'] = _accumulate_gradients(model, micro_batches, autocast, z_loss)
        stats['ascent_grad_norm'] = sam.first_step()
        stats['sam_skipped'] = sam.perturbed_params is None
        optimizer.zero_grad(set_to_none=True)
        stats['sam_loss'] = _accumulate_gradients(model, micro_batches, autocast, z_loss)
        sam.restore()
    else:
        stats['loss'] = _accumulate_gradients(model, micro_batches, autocast, z_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    stats['grad_norm'] = grad_norm
    stats = {k: v.item() if torch.is_tensor(v) else v for k, v in stats.items()}
    # a bad step (non-finite loss or gradient) never reaches the optimizer state. Under DDP the all-reduced gradient
    # norm is the same on every rank, and a non-finite loss on any rank makes it non-finite, so all ranks agree
    if math.isfinite(stats['loss']) and math.isfinite(stats['grad_norm']):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def record_step(stats, it, lr, bad_steps, max_bad_steps, progress, log_path, tokens_per_iter, log_interval, max_iters,
                timer, master, kept, tracker=None):
    """After train_step took step `it` (so iteration it + 1 is reached): count it as bad if its loss or gradient norm
    is not finite (train_step did not step), say so and say when SAM skipped its perturbation, advance the progress
    bar, append the log line (every log_interval, at the end, and on every bad or SAM-skipped step), and stop with one
    line once more than max_bad_steps steps were bad (`kept` names what is left intact). timer = [time, iteration]
    of the last log line, updated in place. tracker (tracking.Tracker) mirrors the log line. Returns bad_steps."""
    bad = not (math.isfinite(stats['loss']) and math.isfinite(stats['grad_norm']))
    bad_steps += bad
    if master and stats.get('sam_skipped'):
        progress.write(f"iter {it}: SAM ascent gradient norm is {stats['ascent_grad_norm']}; perturbation skipped")
    if master and bad and bad_steps <= max_bad_steps:
        progress.write(f"iter {it}: non-finite loss or gradient norm; step skipped ({bad_steps} of max_bad_steps)")
    progress.update(1)
    if master and ((it + 1) % log_interval == 0 or it + 1 == max_iters or bad or stats.get('sam_skipped')):
        record = {'iter': it + 1, 'tokens': (it + 1) * tokens_per_iter, 'lr': lr, **stats,
                  'tokens_per_s': (it + 1 - timer[1]) * tokens_per_iter / (time.time() - timer[0]),
                  **({'bad_step': True, 'bad_steps': bad_steps} if bad else {})}
        append_jsonl(log_path, record)
        if tracker is not None:
            tracker.log(record)
        progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        timer[:] = [time.time(), it + 1]
    check(bad_steps <= max_bad_steps, f"non-finite loss ({stats['loss']}) or gradient norm ({stats['grad_norm']}) at "
          f"iter {it} (bad step {bad_steps}, max_bad_steps={max_bad_steps}); the optimizer did not step; {kept}")
    return bad_steps


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
