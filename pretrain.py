"""
Pretraining and mid-training with AdamW, SAM or Momentum-SAM.

    python pretrain.py configs/cpu_sam.py                                  # one CPU process
    python pretrain.py configs/cpu_sam.py --max_iters=100 --out_dir=out/x  # override any key
    torchrun --standalone --nproc_per_node=8 pretrain.py configs/sam_60m.py

init_from: 'scratch' starts a new model; 'resume' continues out_dir/ckpt.pt exactly
(weights, optimizer, schedule and data position); a checkpoint path starts a new run
from that run's weights (mid-training: new schedule, optimizer and/or SAM); so does a Hugging Face
OLMo-2 checkpoint: hf:allenai/OLMo-2-0425-1B (+ hf_revision) or a local directory (see hf.py).
"""
import os
import sys
from dataclasses import fields

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import keys
from checkpoint import (append_jsonl, build_model, code_version, load_checkpoint, remove_stale_temp_files,
                        save_checkpoint, truncate_log)
from config import check, config_defaults, fail, load_config, sized_by
from data import load_meta, open_tokens, tokenizer_id, train_batch, val_batch
from hf import hf_checkpoint, is_hf_source
from model import GPT, GPTConfig
from sam import SAM
from tracking import Tracker, check_installed
from training import (adamw, estimate_loss, forward_backward, log_steps, lr_at,
                      msam_forward_backward, optimizer_step, read_steps, sam_forward_backward, setup_run,
                      throughput, too_many_bad_steps)

# -----------------------------------------------------------------------------
# defaults: the paper's 60M AdamW recipe on one process; configs/ override them
out_dir = 'out/pretrain'
init_from = 'scratch'  # 'scratch' | 'resume' | path to a checkpoint | hf:NAME or a Hugging Face directory
hf_revision = ''  # with init_from=hf:NAME: Hub branch, tag or commit ('' = main)
keep_optimizer_state = False  # with init_from=<path>: continue the checkpoint's AdamW moments
overwrite = False  # allow init_from='scratch' to replace an existing out_dir/ckpt.pt
# data
data_root = 'data'
dataset = 'wiki_en'
max_train_tokens = 0  # train on only the first N tokens of the train split (0 = all): more epochs, same budget
# logging, evaluation, checkpointing (a checkpoint is written at every evaluation)
eval_interval = 500
eval_iters = 20
log_interval = 10
stop_at_iter = -1  # stop (with a checkpoint) here while scheduling for max_iters; -1 = run to the end
max_bad_steps = 0  # bad steps (non-finite loss/gradient: no optimizer step) to skip before stopping; 0 = stop at once
# experiment tracking (tracking.py; optional packages): log.jsonl mirrored to Weights & Biases and/or TensorBoard
wandb_log = False
wandb_project = 'flatmin'
wandb_run_name = ''  # '' = out_dir's name
wandb_group = ''  # e.g. the experiment (experiment.py sets it)
tensorboard_dir = ''  # '' = off
# batch: tokens per step = batch_size * gradient_accumulation_steps * block_size (all processes together)
batch_size = 32  # per process, per micro-step
block_size = 1024
gradient_accumulation_steps = 8  # in total; divided among processes
# model (GPTConfig fields); vocab_size 0 = the dataset's vocabulary rounded up to a multiple of 128
n_layer = 8
n_head = 8
n_embd = 512
n_kv_head = 0
intermediate_size = 0
vocab_size = 0
rope_theta = 10000.0
norm_eps = 1e-6
qk_norm = False
norm_position = 'pre'
init_std = 0.02
z_loss = 0.0
# optimizer: AdamW, optionally wrapped in SAM
optimizer = 'adamw'  # 'adamw' | 'sam' | 'msam' (Momentum-SAM: perturbed along -AdamW's exp_avg, one gradient a step)
learning_rate = 1e-3
weight_decay = 0.1
decay_embeddings = True
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0  # 0 disables clipping
sam_rho = 0.05
sam_adaptive = False
sam_sync_ascent = False  # DDP: all-reduce the ascent gradient (the paper keeps it local to each GPU)
sam_start_fraction = 0.0  # SAM is used for iterations in [start, end) * max_iters; AdamW elsewhere
sam_end_fraction = 1.0
sam_interval = 1  # inside the window, SAM (or msam) only at iterations divisible by this; plain AdamW steps between
looksam_alpha = 0.0  # > 0 (SAM, sam_interval > 1): LookSAM, steps between reuse the last SAM step's ascent component
# schedule
max_iters = 10000
warmup_iters = 2000
lr_schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant'
anneal_fraction = 0.1  # wsd: fraction of max_iters spent decaying
min_lr_ratio = 0.1
# system
seed = 1337
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
dtype = 'auto'  # 'auto' (bfloat16 on GPUs that have it) | 'bfloat16' | 'float32'
compile = False
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.PRETRAIN)
globals().update(config)
check(warmup_iters <= max_iters, f"warmup_iters ({warmup_iters}) must be <= max_iters ({max_iters})")
check(sam_start_fraction <= sam_end_fraction, "sam_start_fraction must be <= sam_end_fraction")
keys.check_model_shape(n_embd, n_head, n_kv_head)
check(not (optimizer == 'msam' and sam_adaptive), "sam_adaptive is for optimizer='sam'; Momentum-SAM has none")
check(not looksam_alpha or (optimizer == 'sam' and not sam_adaptive),
      "looksam_alpha reuses plain SAM's ascent: it needs optimizer='sam' and sam_adaptive=False")
check_installed(config)

ddp, rank, world_size, device, local_accum, dtype, autocast = setup_run(device, dtype, gradient_accumulation_steps,
                                                                        seed)
master = rank == 0
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
if init_from != 'resume' and os.path.exists(ckpt_path) and not overwrite:  # scratch or mid-training
    fail(f"{ckpt_path} exists: resume it with --init_from=resume, pick another --out_dir, or pass --overwrite=True")

# data -------------------------------------------------------------------------
data_dir = os.path.join(data_root, dataset)
meta = load_meta(data_dir)
train_tokens, val_tokens = open_tokens(data_dir, 'train'), open_tokens(data_dir, 'val')
if max_train_tokens:
    check(max_train_tokens <= len(train_tokens),
          f"max_train_tokens ({max_train_tokens:,}) is more than the train split holds ({len(train_tokens):,})")
    train_tokens = train_tokens[:max_train_tokens]


def get_train_batch(it, micro_step):
    """Micro-step m of iteration it holds global samples [(it * accum + m) * batch_size, ...): rank-independent."""
    first_sample = (it * gradient_accumulation_steps + micro_step) * batch_size
    x, y = train_batch(train_tokens, block_size, batch_size, first_sample, seed, device)
    return x, y, None


def get_val_batch(i):
    return (*val_batch(val_tokens, block_size, batch_size, i, device), None)


# model ------------------------------------------------------------------------
model_keys = [f.name for f in fields(GPTConfig)]
checkpoint = None
if init_from == 'scratch':
    model_args = {k: config[k] for k in model_keys}
    model_args['vocab_size'] = vocab_size or -(-meta['vocab_size'] // 128) * 128
else:
    source_path = ckpt_path if init_from == 'resume' else init_from
    checkpoint = (hf_checkpoint(init_from, hf_revision, meta) if is_hf_source(init_from) else
                  load_checkpoint(source_path, map_location=device))
    model_args = dict(checkpoint['model_args'], block_size=block_size)  # the shape comes from the checkpoint
    if init_from == 'resume':
        for k in model_keys:
            if k != 'block_size' and config[k] != model_args.get(k) and not (k == 'vocab_size' and config[k] == 0):
                fail(f"resume: config has {k}={config[k]!r} but the checkpoint was trained with {model_args.get(k)!r}")
        check('finetune' not in checkpoint,
              f"resume: {ckpt_path} was written by finetune.py; resume it with finetune.py")
    if tokenizer_id(checkpoint.get('tokenizer')) != tokenizer_id(meta['tokenizer']):
        fail(f"dataset {data_dir} is tokenized differently from the checkpoint's training data "
             f"(prepare it with --tokenizer=<the checkpoint's dataset directory>)")
    if init_from == 'resume' and checkpoint.get('data_fingerprint') != meta.get('fingerprint'):
        fail(f"resume: dataset {data_dir} is not the data {ckpt_path} was trained on ({checkpoint.get('dataset')!r}, "
             f"fingerprint {checkpoint.get('data_fingerprint')} vs {meta.get('fingerprint')})")
check(meta['vocab_size'] <= model_args['vocab_size'],
      f"dataset vocabulary ({meta['vocab_size']}) is larger than the model's vocab_size ({model_args['vocab_size']})")
with sized_by('n_layer, n_embd, intermediate_size, vocab_size or block_size'):
    model = (GPT(GPTConfig(**model_args)) if checkpoint is None else
             build_model(model_args, checkpoint['model'], source_path))
    model.to(device)
base_optimizer = adamw(model.param_groups(weight_decay, decay_embeddings), device, lr=learning_rate,
                       betas=(beta1, beta2), eps=eps)
iter_num, bad_steps = 0, 0
# what this run computed, for the report's FLOPs: tokens through a forward and backward (a SAM step's batch twice),
# and through a forward only (evaluation)
compute = {'fwd_bwd_tokens': 0, 'fwd_tokens': 0}
kept_component = None
if init_from == 'resume' or (checkpoint is not None and keep_optimizer_state):
    check('optimizer' in checkpoint, f"{source_path} holds no optimizer state (a quantized or fine-tuned model?); " +
          ("start a new run from it with --init_from=<its path>" if init_from == 'resume' else
           "use --keep_optimizer_state=False"))
    new_groups = [(len(g['params']), g['weight_decay']) for g in base_optimizer.param_groups]
    check([len(g['params']) for g in checkpoint['optimizer']['param_groups']] == [n for n, _ in new_groups],
          f"the optimizer state in {source_path} has other parameter groups "
          f"(trained with another decay_embeddings?); match it, or use --keep_optimizer_state=False")
    base_optimizer.load_state_dict(checkpoint['optimizer'])
    for group, (_, wd) in zip(base_optimizer.param_groups, new_groups):  # the new run's hyperparameters win
        group.update(betas=(beta1, beta2), eps=eps, weight_decay=wd)
if init_from == 'resume':
    iter_num = checkpoint['iter_num']
    bad_steps = checkpoint.get('bad_steps', 0)  # older checkpoints of format 1 lack it
    compute = checkpoint.get('compute', compute)
    kept_component = checkpoint.get('looksam')  # LookSAM's g_v
    torch.set_rng_state(checkpoint['rng_state'].cpu())  # map_location may have moved it to the GPU
start_iter = iter_num
checkpoint = None  # free the memory
sam = SAM(base_optimizer, rho=sam_rho, adaptive=sam_adaptive, sync_ascent=sam_sync_ascent, looksam=looksam_alpha > 0)
if kept_component is not None:  # saved in parameter order
    sam.kept_component = dict(zip(model.parameters(), kept_component))
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)

n_params, n_non_embedding = raw_model.num_params()
flops_per_token = raw_model.flops_per_token()  # a forward and backward
if master:
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_non_embedding / 1e6:.2f}M non-embedding), "
          f"{world_size} process(es) on {device}, {dtype}")
    print(f"tokens per iteration: {tokens_per_iter:,}; run: {max_iters * tokens_per_iter:,} tokens = "
          f"{max_iters * tokens_per_iter / n_params:.3g} per parameter; train split {len(train_tokens):,} tokens "
          f"({max_iters * tokens_per_iter / len(train_tokens):.3g} epochs)")


def save():
    save_checkpoint({
        'model': raw_model.state_dict(), 'optimizer': base_optimizer.state_dict(), 'model_args': model_args,
        'iter_num': iter_num, 'tokens': iter_num * tokens_per_iter, 'bad_steps': bad_steps,
        'compute': compute,
        **({'looksam': [sam.kept_component[p] for p in raw_model.parameters()]} if sam.kept_component else {}),
        'config': config, 'rng_state': torch.get_rng_state(), 'data_fingerprint': meta.get('fingerprint'),
        'dataset': dataset, 'tokenizer': meta.get('tokenizer'), 'code_version': git_commit,
    }, ckpt_path)


def log(record):
    append_jsonl(log_path, record)
    tracker.log(record)


git_commit = code_version()  # once: the code this run started with
if master:
    truncate_log(log_path, iter_num if init_from == 'resume' else -1)  # on resume, drop what came after the checkpoint
    remove_stale_temp_files(out_dir, ('ckpt.pt', 'log.jsonl'))  # a killed run's half-written files
    if iter_num >= max_iters:
        print(f"{ckpt_path} already finished {max_iters} iterations")
tracker = Tracker(config, out_dir, 'pretrain', iter_num if init_from == 'resume' else None, enabled=master)

# training loop ----------------------------------------------------------------
progress = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, desc='pretrain')
speed = throughput(tokens_per_iter, raw_model.flops_per_token(), device, world_size, iter_num)
pending = []  # (iteration, lr, stats) of the steps not read yet: their stats stay on the device until a log step
while True:
    stopping = iter_num >= max_iters or iter_num == stop_at_iter
    if (iter_num % eval_interval == 0 or stopping) and not (init_from == 'resume' and iter_num == start_iter):
        val_loss = estimate_loss(raw_model, get_val_batch, eval_iters, autocast, rank, world_size)
        compute['fwd_tokens'] += eval_iters * batch_size * block_size
        if master:
            progress.write(f"iter {iter_num}: val loss {val_loss:.4f}")
            # training compute only: a stop_at_iter run evaluates once more than the run it resumes into
            log({'iter': iter_num, 'tokens': iter_num * tokens_per_iter, 'val_loss': val_loss,
                 'fwd_bwd_tokens': compute['fwd_bwd_tokens'],
                 'train_flops': flops_per_token * compute['fwd_bwd_tokens']})
            if iter_num > 0:
                save()
    if stopping:
        break
    lr = lr_at(iter_num, learning_rate, max_iters, warmup_iters, lr_schedule, anneal_fraction, min_lr_ratio)
    for group in base_optimizer.param_groups:
        group['lr'] = lr
    in_window = sam_start_fraction * max_iters <= iter_num < sam_end_fraction * max_iters
    use_sam = optimizer in ('sam', 'msam') and in_window and iter_num % sam_interval == 0
    look_back = looksam_alpha > 0 and in_window and not use_sam  # LookSAM: reuse the last SAM step's g_v
    micro_batches = [get_train_batch(iter_num, rank * local_accum + m) for m in range(local_accum)]
    if use_sam and optimizer == 'msam':  # Momentum-SAM: one pass, at w - rho m / ||m||
        stats = msam_forward_backward(model, sam, micro_batches, autocast, z_loss)
    elif use_sam:  # the paper's intervention: the gradient taken at w + rho g / ||g|| updates w (two passes)
        stats = sam_forward_backward(model, sam, micro_batches, autocast, z_loss)
    else:
        stats = {'loss': forward_backward(model, micro_batches, autocast, z_loss)}
        if look_back:
            sam.add_kept_component(looksam_alpha)
    stats['grad_norm'] = optimizer_step(model, base_optimizer, grad_clip, stats['loss'])  # no step if not finite
    compute['fwd_bwd_tokens'] += tokens_per_iter * (2 if use_sam and optimizer == 'sam' else 1)
    pending.append((iter_num, lr, stats))
    iter_num += 1
    progress.update(1)
    log_line = iter_num % log_interval == 0 or iter_num == max_iters
    if log_line or iter_num % eval_interval == 0 or iter_num == stop_at_iter:  # read before every checkpoint too
        records, bad_steps = read_steps(pending, tokens_per_iter, bad_steps)  # one host-device sync
        pending = []
        if log_line:
            records[-1].update(speed(iter_num, passes=2 if use_sam and optimizer == 'sam' else 1))
        if master:
            log_steps(records, log, progress)
        if bad_steps > max_bad_steps:
            fail(f"{too_many_bad_steps(records, max_bad_steps)}; the last good checkpoint ({ckpt_path}) is kept")
progress.close()
tracker.close()
if ddp:  # wait for rank 0's last checkpoint: a rank tearing gloo down first can abort (SIGABRT) the other
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
