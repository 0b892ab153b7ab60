"""
Evaluate checkpoints (base, fine-tuned, quantized) on the same data: pretraining validation loss (forgetting),
fine-tuning task validation loss (learning) and, optionally, sharpness.

    python evaluate.py --checkpoints='out/a/ckpt.pt,out/b/ckpt.pt' --tasks='gsm8k' --sharpness='noise,hessian,trace,sam' --out=out/eval.json

Pretraining validation: the first eval_iters fixed batches (data.val_batch) of batch_size x block_size tokens of one
prepared dataset for the whole run - pretrain_data, else the first checkpoint's data_root/dataset - so every
checkpoint is scored on the same tokens; a checkpoint whose tokenizer differs from that data's is refused.
Tasks: tasks.task_tensors(task, 'val', ...) (val_tokens tokens from `source`), built once; the loss is
the per-token mean over all trained (masked) tokens. ppl = exp(loss).

Sharpness (sharpness.py, float32, eval mode, on pretraining validation batches):
  noise    the paper's proxy: loss over the eval_iters batches after Gaussian noise on every tensor at each of
           noise_sigmas, mean of noise_seeds seeds; noise_scaling 'absolute' (std = sigma, the default)
           or 'relative' (std = sigma * rms(W)). PAPER.md calls the authors' rule ambiguous; we default to
           absolute because on the CPU preset (weights ~0.02) the paper's grid then spans +0.035 to +4.2 nats,
           while relative noise moves the loss by < 0.01 over the whole grid (measured with this script).
  hessian  top Hessian eigenvalue by Lanczos (at most hessian_iters HVPs; stops at a relative residual hessian_tol)
  trace    Hessian trace by Hutchinson, trace_samples Rademacher probes
  sam      L(w + sam_rho g/||g||) - L(w)
hessian, trace and sam use the first sharpness_batches of the validation batches (HVPs are costly).

Output (JSON, rewritten atomically after each checkpoint, so a long run keeps what it finished):
  {checkpoint: {pretrain_val_loss, pretrain_ppl, tasks: {task: {loss, ppl, tokens}}, sharpness: {measure: {...}},
                cost: {pretrain_val | task:<name> | <measure>: {seconds, forward_passes | hvps, ...}},
                iter_num, tokens, quantization: {method, rel_error, bytes_after} (quantized checkpoints only),
                eval: {data_dir, eval_iters, batch_size, block_size, dtype}}}
"""
import math
import os
import sys
import time


from checkpoint import build_model, load_checkpoint, load_model, write_json
from config import check, check_choice, config_defaults, fail, load_config
from data import load_meta, load_tokenizer, open_tokens, tokenizer_id, val_batch
from sharpness import hessian_trace, noise_proxy, sam_sharpness, top_hessian_eigenvalue
from training import autocast_context, estimate_loss, setup_device

# -----------------------------------------------------------------------------
checkpoints = ''  # comma-separated checkpoint paths
out = 'out/eval.json'
pretrain_data = ''  # prepared dataset directory; '' = the first checkpoint's data_root/dataset
eval_iters = 16  # pretraining validation batches (the CPU presets' 16 x 16 x 256 = the whole wiki_en val split)
batch_size = 16
block_size = 0  # 0 = the first checkpoint's
tasks = ''  # comma-separated task names (or .jsonl paths), see tasks.py
val_tokens = 65536  # per task
source = 'offline'  # tasks: 'offline' (stand-ins) | 'hub' (the paper's datasets), as in finetune.py
sharpness = ''  # comma-separated: noise, hessian, trace, sam
sharpness_batches = 2  # validation batches for hessian / trace / sam
noise_sigmas = (0.009, 0.013, 0.017, 0.02, 0.025, 0.03, 0.05, 0.075, 0.1)
noise_seeds = 3
noise_scaling = 'absolute'  # 'absolute' | 'relative' (see the docstring)
hessian_iters = 20
hessian_tol = 1e-3
trace_samples = 10
sam_rho = 0.05
seed = 1337  # noise directions, Lanczos start vector, Hutchinson probes
device = 'auto'
dtype = 'float32'  # losses only ('bfloat16' autocast); sharpness is always float32
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:])
globals().update(config)
MEASURES = ('noise', 'hessian', 'trace', 'sam')
paths = [p.strip() for p in checkpoints.split(',') if p.strip()]
task_names = [t.strip() for t in tasks.split(',') if t.strip()]
measures = [m.strip() for m in sharpness.split(',') if m.strip()]
check(paths, "checkpoints must list at least one checkpoint (--checkpoints='out/a/ckpt.pt,out/b/ckpt.pt')")
check(len(set(paths)) == len(paths), "checkpoints lists a checkpoint twice")
for m in measures:
    check(m in MEASURES, f"unknown sharpness measure {m!r}; use a comma-separated subset of {', '.join(MEASURES)}")
check_choice(config, 'noise_scaling', ('relative', 'absolute'))
check_choice(config, 'dtype', ('float32', 'bfloat16'))
for key in ('eval_iters', 'batch_size', 'val_tokens', 'sharpness_batches', 'noise_seeds', 'hessian_iters',
            'trace_samples'):
    check(config[key] > 0, f"{key} must be positive, got {config[key]}")
check(block_size >= 0, f"block_size must be >= 0 (0 = the checkpoint's), got {block_size}")
check(len(noise_sigmas) > 0 and all(isinstance(s, (int, float)) and s >= 0 for s in noise_sigmas),
      f"noise_sigmas must be a non-empty list of numbers >= 0, got {noise_sigmas!r}")
check(hessian_tol >= 0 and sam_rho > 0, "hessian_tol must be >= 0 and sam_rho > 0")
check(not os.path.isdir(out), f"out {out} is a directory; give a file path such as out/eval.json")

# checkpoints and data: all validated before any work ------------------------
infos = {}
for path in paths:
    ckpt = load_checkpoint(path)  # fails on missing / corrupt; the model itself is loaded later, one at a time
    build_model(ckpt['model_args'], ckpt['model'], path, check_only=True)  # weights of another architecture
    infos[path] = {k: ckpt.get(k) for k in ('model_args', 'config', 'tokenizer', 'iter_num', 'tokens', 'quantization')}
    del ckpt
first = infos[paths[0]]
if not pretrain_data:
    cfg = first['config'] or {}
    if not cfg.get('dataset'):
        fail(f"{paths[0]} does not name its pretraining data; pass --pretrain_data=<prepared dataset directory>")
    pretrain_data = os.path.join(cfg.get('data_root', 'data'), cfg['dataset'])
meta = load_meta(pretrain_data)
val_data = open_tokens(pretrain_data, 'val', meta)
block_size = block_size or first['model_args']['block_size']
for path, info in infos.items():
    if tokenizer_id(info['tokenizer']) != tokenizer_id(meta['tokenizer']):
        fail(f"{path} uses another tokenizer than {pretrain_data} (and the other checkpoints); "
             f"compare checkpoints of one tokenizer, on data prepared with it")
    check(info['model_args']['block_size'] >= block_size,
          f"{path} has block_size {info['model_args']['block_size']} < the evaluation's {block_size}")
    check(info['model_args']['vocab_size'] >= meta['vocab_size'],
          f"{path} has vocab_size {info['model_args']['vocab_size']} < {pretrain_data}'s {meta['vocab_size']}")
_, _, _, device = setup_device(device)
autocast = autocast_context(device, dtype)
val_batches = [(*val_batch(val_data, block_size, batch_size, i, device), None) for i in range(eval_iters)]
task_data = {}
if task_names:
    import tasks as task_lib  # only when asked for: pretraining-only evaluation needs none of its dependencies
    enc = load_tokenizer(meta)
    for task in task_names:
        # the validation split does not depend on seed (tasks.py draws it from its own fixed stream)
        x, y, mask = task_lib.task_tensors(task, 'val', enc, block_size, max_tokens=val_tokens, seed=1337,
                                           source=source)
        check(len(x) > 0 and mask.any(), f"task {task} has an empty validation set")
        task_data[task] = (x, y, mask)


def timed(fn, *args, **kwargs):
    start = time.time()
    value = fn(*args, **kwargs)
    return value, time.time() - start


# evaluate ---------------------------------------------------------------------
results = {}
for path in paths:
    info = infos[path]
    model, _ = load_model(path, device)  # float32, eval mode
    print(f"{path}: iter {info['iter_num']}" + (f", {info['quantization']['method']}" if info['quantization'] else ''))
    loss, seconds = timed(estimate_loss, model, lambda i: val_batches[i], eval_iters, autocast)
    # per batch too: the report's intervals on quantization forgetting resample these batches (paired across models)
    batch_losses = [estimate_loss(model, lambda _, i=i: val_batches[i], 1, autocast) for i in range(eval_iters)]
    result = {'pretrain_val_loss': loss, 'pretrain_ppl': math.exp(loss), 'pretrain_val_batch_losses': batch_losses,
              'params': dict(zip(('total', 'non_embedding'), model.num_params())), 'tasks': {}, 'sharpness': {},
              'cost': {'pretrain_val': {'seconds': seconds, 'forward_passes': eval_iters}},
              'iter_num': info['iter_num'], 'tokens': info['tokens'],
              'eval': {'data_dir': pretrain_data, 'eval_iters': eval_iters, 'batch_size': batch_size,
                       'block_size': block_size, 'dtype': dtype}}
    if info['quantization']:
        result['quantization'] = {k: info['quantization'].get(k) for k in ('method', 'rel_error', 'bytes_after')}
    print(f"  pretrain val loss {loss:.4f} (ppl {math.exp(loss):.2f}) in {seconds:.1f} s")
    for task, (x, y, mask) in task_data.items():
        n_batches, count = -(-len(x) // batch_size), int(mask.sum())
        task_batch = lambda i: tuple(t[i * batch_size:(i + 1) * batch_size].to(device) for t in (x, y, mask))  # noqa: E731
        loss, seconds = timed(estimate_loss, model, task_batch, n_batches, autocast)
        passes = n_batches
        result['tasks'][task] = {'loss': loss, 'ppl': math.exp(loss), 'tokens': count}
        result['cost'][f'task:{task}'] = {'seconds': seconds, 'forward_passes': passes}
        print(f"  {task} val loss {loss:.4f} (ppl {math.exp(loss):.2f}) over {count} tokens in {seconds:.1f} s")
    few = val_batches[:sharpness_batches]
    for m in measures:
        if m == 'noise':
            value, cost = noise_proxy(model, val_batches, noise_sigmas, noise_seeds, noise_scaling, seed)
            increases = zip(value['sigmas'], value['loss_increase'])
            summary = 'loss increase ' + ', '.join(f'{s}: {d:+.4f}' for s, d in increases)
        elif m == 'hessian':
            value, cost = top_hessian_eigenvalue(model, few, hessian_iters, hessian_tol, seed)
            summary = (f"top eigenvalue {value['top_eigenvalue']:.4g} after {value['iterations']} Lanczos steps, "
                       f"residual {value['residual']:.2g}" + ('' if value['converged'] else ' (not converged)'))
        elif m == 'trace':
            value, cost = hessian_trace(model, few, trace_samples, seed)
            summary = f"trace {value['trace']:.4g}" + (f" +- {value['stderr']:.2g}" if value['stderr'] else '')
        else:
            value, cost = sam_sharpness(model, few, sam_rho)
            summary = f"L(w+e) - L(w) = {value['sharpness']:.4g} (rho {sam_rho})"
        result['sharpness'][m], result['cost'][m] = value, cost
        counts = ', '.join(f'{v} {k}' for k, v in cost.items() if k != 'seconds')
        print(f"  {m}: {summary} [{cost['seconds']:.1f} s, {counts}]")
    results[path] = result
    write_json(results, out)
    del model
print(f"wrote {out}")
