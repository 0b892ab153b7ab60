"""
Supervised fine-tuning (SFT) of a base checkpoint, measuring learning and forgetting.

    python finetune.py configs/sft/gsm8k.py --init_from=out/cpu_sam/ckpt.pt --learning_rate=3e-4
    python finetune.py configs/sft/gsm8k.py --init_from=resume --learning_rate=3e-4   # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=8 finetune.py configs/sft/starcoder.py --init_from=out/sam_60m/ckpt.pt \
        --batch_size=8 --block_size=1024 --max_tokens=10000000 --device=cuda   # the paper's setting (see configs/sft/)
    python finetune.py configs/sft/metamath.py --source=hub --init_from=hf:allenai/OLMo-2-0425-1B \
        --pretrain_data=data/dolmino   # a Hugging Face model (hf.py), forgetting on data prepared with its tokenizer

The paper's recipe (fresh AdamW, warmup then cosine, one pass over at most max_tokens of the task from tasks.py).
At iteration 0, every eval_interval and at the end it measures learning (the task's validation loss) and forgetting
(the loss on the base model's pretraining validation split) into out_dir/result.json; out_dir/ckpt.pt is written at
every evaluation after iteration 0. What is measured, the files and what a resume checks: docs/measurement.md.

--cache_dir=DIR (experiment.py passes out_dir/cache): the runs of a sweep that share DIR build the task's data once
and evaluate the base model once (iteration 0 does not depend on the learning rate); results are bit-identical.

Forgetting mitigations (docs/forgetting_per_flop.md): replay_fraction (pretraining text mixed into the batches),
l2_init (+ ewc_sequences: a pull toward the base weights), lora_rank (LoRA adapters, merged into the saved weights).
result.json's compute holds the tokens that went through a forward and backward, and the training FLOPs.
"""
import hashlib
import json
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import keys
from checkpoint import (append_jsonl, build_model, code_version, load_checkpoint, remove_stale_temp_files,
                        save_checkpoint, truncate_log, write_json)
from config import check, config_defaults, fail, load_config
from data import load_meta, load_tokenizer, open_tokens, sample_chunks, tokenizer_id, train_batch, val_batch
from hf import hf_as_checkpoint, is_hf_source
from lora import adapter_state, add_lora, load_adapter_state, merged_state_dict
from tasks import task_tensors
from tracking import Tracker, check_installed
from training import (adamw, estimate_loss, log_steps, lr_at, read_steps, setup_run,
                      throughput, too_many_bad_steps, train_step)

# -----------------------------------------------------------------------------
# defaults: the paper's small-model SFT recipe on one process; configs/sft/ override them
out_dir = 'out/finetune'
# required: the base model's checkpoint (pretrain.py's, or finetune.py's), or 'resume' (out_dir/ckpt.pt), or a Hugging
# Face model: hf:NAME or a local directory (needs pretrain_data prepared with its tokenizer; see hf.py)
init_from = ''
hf_revision = ''  # with init_from=hf:NAME: Hub branch, tag or commit ('' = main)
overwrite = False  # allow replacing an existing out_dir/result.json and ckpt.pt
# task (see tasks.py)
task = 'gsm8k'  # gsm8k | stackmathqa | starcoder | musicpile | tulu | metamath | french | path of a .jsonl file
source = 'offline'  # 'offline' (stand-ins, no internet) | 'hub' (the paper's datasets)
max_tokens = 10_000_000  # fine-tuning tokens; the paper's 10M (GSM8K: all of it, ~1.2M)
val_tokens = 65536  # fine-tuning validation tokens (learning)
# forgetting: loss on the base model's pretraining validation split
pretrain_data = ''  # prepared dataset directory; '' = the base checkpoint's data_root/dataset
eval_interval = 50
eval_iters = 20  # pretraining validation batches of batch_size x block_size
log_interval = 10
max_bad_steps = 0  # bad steps (non-finite loss/gradient: no optimizer step) to skip before stopping; 0 = stop at once
cache_dir = ''  # '' = none; else where the runs of a sweep share task data and the base model's evaluation (see below)
# experiment tracking (tracking.py; optional packages): log.jsonl mirrored to Weights & Biases and/or TensorBoard
wandb_log = False
wandb_project = 'flatmin'
wandb_run_name = ''  # '' = out_dir's name
wandb_group = ''  # e.g. the experiment (experiment.py sets it)
tensorboard_dir = ''  # '' = off
# batch: tokens per step = batch_size * gradient_accumulation_steps * block_size (all processes together)
batch_size = 8  # per process, per micro-step
block_size = 0  # 0 = the base model's context
gradient_accumulation_steps = 8  # in total; divided among processes (8 x 8 = the paper's 64 sequences)
# optimizer: AdamW, fresh state
learning_rate = 1e-4  # the paper sweeps it (7-11 values per base model)
warmup_fraction = 0.1
min_lr_ratio = 0.1
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0  # 0 disables clipping
# forgetting mitigations (docs/forgetting_per_flop.md); all off by default
replay_fraction = 0.0  # share of each micro-batch's sequences that are pretraining text, added beside the task's
l2_init = 0.0  # adds l2_init x ||w - w_base||^2 to the loss
ewc_sequences = 0  # with l2_init: EWC, each weight's term scaled by a diagonal Fisher of this many pretraining seqs
lora_rank = 0  # > 0: train LoRA adapters of this rank on the attention and MLP matrices (peft); saved merged
lora_alpha = 16.0  # LoRA's scale is lora_alpha / lora_rank
# system
seed = 1337  # training data (generated examples and their order)
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
dtype = 'auto'  # 'auto' (bfloat16 on GPUs that have it) | 'bfloat16' | 'float32'
compile = False
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.FINETUNE)
globals().update(config)
check(init_from != 'scratch', "init_from must be the path of a base checkpoint or 'resume', got 'scratch'")
check(not os.path.isfile(cache_dir), f"cache_dir {cache_dir} is a file; give a directory")
check_installed(config)
check(not ewc_sequences or l2_init > 0, "ewc_sequences weights the l2_init term: set l2_init > 0 too")
check(not (lora_rank and l2_init), "l2_init pulls the full weights toward the base; with lora_rank only adapters train")

ddp, rank, world_size, device, local_accum, dtype, autocast = setup_run(device, dtype, gradient_accumulation_steps,
                                                                        seed)
master = rank == 0
ckpt_path, result_path, log_path = (os.path.join(out_dir, f) for f in ('ckpt.pt', 'result.json', 'log.jsonl'))
resume = init_from == 'resume'
if resume:
    check(os.path.exists(ckpt_path), f"nothing to resume: {ckpt_path} does not exist (a run writes it at its first "
          f"evaluation after iteration 0); start over with --init_from=<base checkpoint> --overwrite=True")
else:
    check(os.path.abspath(init_from) != os.path.abspath(ckpt_path),
          f"init_from is {ckpt_path} itself; pick another out_dir")
    for path in (result_path, ckpt_path):
        check(overwrite or not os.path.exists(path), f"{path} exists: resume it with --init_from=resume, pick another "
              f"--out_dir or pass --overwrite=True")

# base model (or the run to resume) and its pretraining data ----------------------
source_path = ckpt_path if resume else init_from
checkpoint = (hf_as_checkpoint(init_from, hf_revision, pretrain_data) if not resume and is_hf_source(init_from) else
              load_checkpoint(source_path, map_location=device))
if resume:
    check('finetune' in checkpoint and 'result' in checkpoint, f"resume: {ckpt_path} was not written by finetune.py "
          f"(or by a version that could not resume)")
    init_from = config['init_from'] = checkpoint['finetune']['init_from']  # the base model, as result.json names it
base_config = checkpoint.get('config') or {}
if not pretrain_data:
    check(base_config.get('dataset'),
          f"{init_from} does not name its pretraining data; pass --pretrain_data=<directory>")
    pretrain_data = os.path.join(base_config.get('data_root', 'data'), base_config['dataset'])
meta = load_meta(pretrain_data)
if tokenizer_id(checkpoint.get('tokenizer')) != tokenizer_id(meta['tokenizer']):
    fail(f"{pretrain_data} is tokenized differently from the data {source_path} was trained on; "
         f"forgetting must be measured on the base model's own pretraining data (--pretrain_data)")
check(not resume or checkpoint.get('data_fingerprint') == meta.get('fingerprint'),
      f"resume: {pretrain_data} is not the pretraining data {ckpt_path} measured forgetting on (fingerprint differs)")
enc = load_tokenizer(meta)  # the base model's tokenizer, which the task is encoded with
pt_val_tokens = open_tokens(pretrain_data, 'val', meta)
model_args = dict(checkpoint['model_args'])
block_size = block_size or model_args['block_size']
if master and block_size > model_args['block_size']:
    print(f"note: block_size {block_size} is longer than the base model's context ({model_args['block_size']})")
model_args['block_size'] = block_size  # RoPE tables are built for it
config.update(pretrain_data=pretrain_data, block_size=block_size)  # recorded as resolved
if resume:  # a resumed run must be the run it continues: the same recipe, data and evaluation
    for key in sorted(set(config) - {'out_dir', 'init_from', 'overwrite', 'device', 'compile', 'log_interval',
                                     'eval_interval', 'max_bad_steps', 'wandb_log', 'wandb_project',
                                     'wandb_run_name', 'wandb_group', 'tensorboard_dir', 'cache_dir'}):
        check(config[key] == checkpoint['config'].get(key), f"resume: {key}={config[key]!r} but {ckpt_path} was "
              f"trained with {checkpoint['config'].get(key)!r}; resume with the run's own settings")
check(meta['vocab_size'] <= model_args['vocab_size'],
      f"{pretrain_data}'s vocabulary ({meta['vocab_size']}) is larger than the model's vocab_size "
      f"({model_args['vocab_size']})")

# task data -----------------------------------------------------------------------
check(val_tokens >= batch_size * block_size, f"val_tokens ({val_tokens}) must hold at least one batch "
      f"(batch_size x block_size = {batch_size * block_size})")
task_cache = os.path.join(cache_dir, 'tasks') if cache_dir else ''
train_x, train_y, train_mask = task_tensors(task, 'train', enc, block_size, max_tokens, seed, source, task_cache)
val_x, val_y, val_mask = task_tensors(task, 'val', enc, block_size, val_tokens, seed, source, task_cache)
n_val_batches = len(val_x) // batch_size  # whole batches: every evaluation sees the same sequences
check(n_val_batches > 0, f"the validation split of {task} holds {len(val_x)} sequences of {block_size} tokens, "
      f"less than one batch of {batch_size}")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # fine-tuning tokens (replay comes beside them)
n_replay = round(batch_size * replay_fraction / (1 - replay_fraction))  # pretraining sequences per micro-step
check(not replay_fraction or n_replay > 0, f"replay_fraction {replay_fraction} adds no sequence to a micro-batch of "
      f"{batch_size}: raise it or batch_size")
pt_train_tokens = open_tokens(pretrain_data, 'train', meta) if n_replay or ewc_sequences else None
max_iters = len(train_x) // (gradient_accumulation_steps * batch_size)  # one pass at most
check(max_iters > 0, f"the training split of {task} holds {len(train_x)} sequences of {block_size} tokens, "
      f"less than one step of {gradient_accumulation_steps * batch_size}")
warmup_iters = round(warmup_fraction * max_iters)
task_bytes = b''.join(t.numpy().tobytes() for t in (train_x, train_mask, val_x, val_mask))
task_fingerprint = hashlib.sha256(task_bytes).hexdigest()[:16]
del task_bytes
check(not resume or checkpoint.get('task_fingerprint') == task_fingerprint, f"resume: the {task} data ({source}) "
      f"differs from the data {ckpt_path} was trained on (fingerprint differs; did the source change?)")
# The base model's evaluation (iteration 0) is the same for every learning rate of a sweep: with a cache_dir it is
# kept in cache_dir/base_eval/<hash of all it depends on>.json and read back (floats round-trip JSON exactly). Not
# under DDP, where every rank must take part in the evaluation.
base_eval_path = ''
if cache_dir and world_size == 1 and not resume:
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint['model'].items()):
        digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    pt_tokens_read = min(len(pt_val_tokens) - 1, eval_iters * batch_size * block_size) + 1  # what val_batch reads
    digest.update(pt_val_tokens[:pt_tokens_read].tobytes())
    digest.update(repr([model_args, task_fingerprint, batch_size, eval_iters, dtype, torch.device(device).type,
                        torch.__version__, torch.get_num_threads(), compile]).encode())
    for code in ('finetune.py', 'model.py', 'training.py', 'data.py'):  # how it is computed
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), code), 'rb') as f:
            digest.update(f.read())
    base_eval_path = os.path.join(cache_dir, 'base_eval', digest.hexdigest()[:20] + '.json')


def get_train_batch(it, micro_step):
    """Micro-step m of iteration it holds global samples [(it * accum + m) * batch_size, ...): rank-independent."""
    sample = it * gradient_accumulation_steps + micro_step
    rows = torch.tensor(sample_chunks(sample * batch_size, batch_size, len(train_x), seed))
    x, y, mask = train_x[rows], train_y[rows], train_mask[rows]
    if n_replay:  # pretraining text, every token trained: in the training loss, never in the ft_val_loss metric
        replay_x, replay_y = train_batch(pt_train_tokens, block_size, n_replay, sample * n_replay, seed)
        x, y = torch.cat([x, replay_x.to(x.dtype)]), torch.cat([y, replay_y.to(y.dtype)])
        mask = torch.cat([mask, torch.ones_like(replay_y, dtype=mask.dtype)])
    return x.to(device), y.to(device), mask.to(device)


def get_ft_val_batch(i):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    return val_x[rows].to(device), val_y[rows].to(device), val_mask[rows].to(device)


def get_pt_val_batch(i):
    return (*val_batch(pt_val_tokens, block_size, batch_size, i, device), None)


# model ---------------------------------------------------------------------------
# the base weights, for l2_init's pull and for rebuilding a resumed LoRA run (whose checkpoint holds merged weights)
lora_resume = resume and 'lora' in checkpoint  # a finished LoRA run's checkpoint has none, and needs none
base_state = None
if l2_init or lora_resume:
    base_state = checkpoint['model'] if not resume else load_checkpoint(init_from, map_location=device)['model']
compute = {'fwd_bwd_tokens': 0, 'fwd_tokens': 0, 'train_flops': 0}  # for the report's FLOPs; see fwd_bwd_flops
if l2_init:
    base_model = build_model(model_args, base_state, init_from).to(device)
    flops_per_token = base_model.flops_per_token() // 3  # a forward (model.py counts forward and backward)
    base_weights = [p.detach().clone() for p in base_model.parameters()]
    l2_weights = None  # plain L2: every weight alike
    if ewc_sequences:  # diagonal empirical Fisher of the pretraining loss at the base weights, one sequence at a time
        l2_weights = [torch.zeros_like(p) for p in base_weights]
        for i in range(ewc_sequences):
            x, y = train_batch(pt_train_tokens, block_size, 1, i, seed + 1, device)
            base_model.zero_grad(set_to_none=True)
            with autocast:
                base_model(x, y)[1].backward()
            grads = [p.grad for p in base_model.parameters()]
            torch._foreach_addcmul_(l2_weights, grads, grads, value=1 / ewc_sequences)
        mean = sum(w.sum() for w in l2_weights) / sum(w.numel() for w in l2_weights)
        torch._foreach_div_(l2_weights, mean)  # mean 1: l2_init sets the overall strength as for plain L2
        compute['fwd_bwd_tokens'] += ewc_sequences * block_size
        compute['train_flops'] += 3 * flops_per_token * ewc_sequences * block_size
    del base_model
model = build_model(model_args, base_state if lora_resume else checkpoint['model'], source_path).to(device)
flops_per_token = model.flops_per_token() // 3  # a forward (model.py counts forward and backward)
if lora_rank and (not resume or lora_resume):
    model = add_lora(model, lora_rank, lora_alpha)
    if lora_resume:
        load_adapter_state(model, checkpoint['lora'])
trained = [p for p in model.parameters() if p.requires_grad]
n_adapter = sum(p.numel() for p in trained) if lora_rank else 0
# a forward and backward: the forward, the activations' gradients (as much again) and, for every trained weight, its
# gradient (as much again); LoRA trains only its adapters, whose forward adds 2 FLOPs per parameter
fwd_bwd_flops = 2 * (flops_per_token + 2 * n_adapter) + 2 * n_adapter if lora_rank else 3 * flops_per_token
groups = [{'params': trained, 'weight_decay': weight_decay}] if lora_rank else model.param_groups(weight_decay)
optimizer = adamw(groups, device, lr=learning_rate, betas=(beta1, beta2), eps=eps)


def add_l2_init_grad():
    """The gradient of l2_init x sum(F (w - w_base)^2), F the Fisher weights (1 for plain L2)."""
    params = list(raw_model.parameters())
    with torch.no_grad():
        pull = torch._foreach_sub(params, base_weights)
        if l2_weights is not None:
            torch._foreach_mul_(pull, l2_weights)
        torch._foreach_add_([p.grad for p in params], pull, alpha=2 * l2_init)

result = {'task': task, 'source': source, 'init_from': init_from, 'learning_rate': learning_rate,
          'max_tokens': max_tokens, 'tokens_per_iter': tokens_per_iter, 'max_iters': max_iters,
          'base': None, 'trajectory': [], 'final': None, 'compute': compute, 'config': config}
iter_num, lr, bad_steps = 0, 0.0, 0
if resume:
    iter_num, bad_steps = checkpoint['iter_num'], checkpoint['bad_steps']
    result.update({k: checkpoint['result'][k] for k in ('base', 'trajectory', 'final')})
    compute = result['compute'] = checkpoint['result'].get('compute', compute)
    lr = result['trajectory'][-1]['lr']
    torch.set_rng_state(checkpoint['rng_state'].cpu())  # map_location may have moved it to the GPU
    if iter_num < max_iters:  # a finished run's checkpoint has no optimizer state, and needs none
        optimizer.load_state_dict(checkpoint['optimizer'])
start_iter = iter_num
checkpoint = None  # free the memory
raw_model = model
if compile:
    model = torch.compile(model)
eval_model = model  # not DDP's wrapper: evaluation syncs nothing
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)
if master:
    print(f"fine-tuning {init_from} on {task} ({source}): {len(train_x) * block_size:,} training tokens "
          f"({'all of the split' if len(train_x) < max_tokens // block_size else f'max_tokens={max_tokens:,}'})"
          f", {max_iters} steps of {tokens_per_iter:,} tokens, {world_size} process(es) on {device}, {dtype}")
    print(f"learning: {n_val_batches * batch_size * block_size:,} {task} validation tokens; forgetting: {eval_iters} "
          f"batches of {pretrain_data} val")


def evaluate(it, lr):
    cached = read_base_eval() if it == 0 and base_eval_path else None
    if cached:
        ft, pt = cached
    else:
        ft = estimate_loss(eval_model, get_ft_val_batch, n_val_batches, autocast, rank, world_size)
        pt = estimate_loss(eval_model, get_pt_val_batch, eval_iters, autocast, rank, world_size)
    compute['fwd_tokens'] += (n_val_batches + eval_iters) * batch_size * block_size  # counted cached or not
    if not master:
        return
    losses = {'ft_val_loss': ft, 'pt_val_loss': pt}
    if it == 0 and base_eval_path and not cached:
        write_json(losses, base_eval_path)
    result['base'] = result['base'] or losses
    result['trajectory'].append({'iter': it, 'tokens': it * tokens_per_iter, 'lr': lr, **losses})
    result['final'] = losses if it == max_iters else None
    write_json(result, result_path)
    log({'iter': it, 'tokens': it * tokens_per_iter, **losses})
    progress.write(f"iter {it}: {task} val loss {ft:.4f}, pretraining val loss {pt:.4f}"
                   + (f" (the base model's, from {base_eval_path})" if cached else ''))


def read_base_eval():
    """(ft_val_loss, pt_val_loss) of the base model from base_eval_path, or None (not written yet, or damaged)."""
    try:
        with open(base_eval_path) as f:
            losses = json.load(f)
        return float(losses['ft_val_loss']), float(losses['pt_val_loss'])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def log(record):
    append_jsonl(log_path, record)
    tracker.log(record)


def save(final):
    """The model and what resuming needs; the final checkpoint drops the optimizer state (it is only for resuming).
    config carries data_root/dataset as pretrain.py's does, so tools that look up a base checkpoint's pretraining data
    (evaluate.py, a further finetune.py) find it in this one too."""
    data_root, dataset = os.path.split(os.path.normpath(pretrain_data))
    save_checkpoint({
        'model': merged_state_dict(raw_model) if lora_rank else raw_model.state_dict(),
        **({} if final else {'optimizer': optimizer.state_dict()}),
        **({'lora': adapter_state(raw_model)} if lora_rank and not final else {}),
        'model_args': model_args, 'iter_num': iter_num, 'tokens': iter_num * tokens_per_iter,
        'config': {**config, 'data_root': data_root, 'dataset': dataset}, 'dataset': dataset,
        'data_fingerprint': meta.get('fingerprint'), 'tokenizer': meta['tokenizer'], 'code_version': git_commit,
        'task_fingerprint': task_fingerprint, 'rng_state': torch.get_rng_state(), 'bad_steps': bad_steps,
        'result': result,
        'finetune': {'task': task, 'source': source, 'init_from': init_from, 'result': result['final']},
    }, ckpt_path)


git_commit = code_version()
if master:
    if not resume and overwrite and os.path.exists(ckpt_path):  # an old model must not sit beside the new results
        os.remove(ckpt_path)
    truncate_log(log_path, iter_num if resume else -1)  # on resume, drop what came after the checkpoint
    remove_stale_temp_files(out_dir, ('ckpt.pt', 'result.json', 'log.jsonl'))  # a killed run's half-written files
    if resume and iter_num == max_iters:
        print(f"{ckpt_path} already finished {max_iters} iterations")
tracker = Tracker(config, out_dir, 'finetune', iter_num if resume else None, enabled=master)

# training loop -------------------------------------------------------------------
progress = tqdm(total=max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, desc=f'finetune {task}')
speed = throughput(tokens_per_iter, raw_model.flops_per_token(), device, world_size, iter_num)
pending = []  # (iteration, lr, stats) of the steps not read yet: their stats stay on the device until a log step
while True:
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not (resume and iter_num == start_iter):
        evaluate(iter_num, lr)
        if master and iter_num > 0:
            save(final=iter_num == max_iters)
    if iter_num == max_iters:
        break
    lr = lr_at(iter_num, learning_rate, max_iters, warmup_iters, 'cosine', min_lr_ratio=min_lr_ratio)
    for group in optimizer.param_groups:
        group['lr'] = lr
    micro_batches = [get_train_batch(iter_num, rank * local_accum + m) for m in range(local_accum)]
    pending.append((iter_num, lr, train_step(model, optimizer, micro_batches, autocast, grad_clip,
                                             adjust_grad=add_l2_init_grad if l2_init else None)))
    step_tokens = sum(x.numel() for x, _, _ in micro_batches) * world_size
    compute['fwd_bwd_tokens'] += step_tokens
    compute['train_flops'] += fwd_bwd_flops * step_tokens
    iter_num += 1
    progress.update(1)
    log_line = iter_num % log_interval == 0 or iter_num == max_iters
    if log_line or iter_num % eval_interval == 0:  # read before every checkpoint too
        records, bad_steps = read_steps(pending, tokens_per_iter, bad_steps)  # one host-device sync
        pending = []
        if log_line:
            records[-1].update(speed(iter_num, passes=1))
        if master:
            log_steps(records, log, progress)
        if bad_steps > max_bad_steps:
            fail(f"{too_many_bad_steps(records, max_bad_steps)}; {result_path} and the last checkpoint ({ckpt_path}, "
                 f"if any) are kept")
progress.close()
tracker.close()
if ddp:  # wait for rank 0's checkpoint: a rank tearing gloo down first can abort (SIGABRT) the other
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
