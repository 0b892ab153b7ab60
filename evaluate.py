"""
Evaluate checkpoints (base, fine-tuned, quantized) on the same data: pretraining validation loss (forgetting),
fine-tuning task validation loss (learning) and, optionally, sharpness.

    python evaluate.py --checkpoints='out/a/ckpt.pt,out/b/ckpt.pt' --tasks=gsm8k --out=out/eval.json
    python evaluate.py --checkpoints=out/a/ckpt.pt --sharpness='noise,hessian,trace,sam' --out=out/a_sharpness.json
    python evaluate.py --checkpoints='out/sam/ckpt.pt,out/sam_nf4/ckpt.pt' --lm_eval_tasks=arc_challenge,hellaswag \
        --lm_eval_num_fewshot=0 --lm_eval_limit=500      # benchmark scores with lm-evaluation-harness
    python evaluate.py --checkpoints=hf:allenai/OLMo-2-0425-1B --hf_revision=stage1-step1907359-tokens4001B \
        --pretrain_data=data/dolmino --lm_eval_tasks=arc_challenge   # a Hugging Face model (hf.py) as any checkpoint

Every checkpoint (ours, or a Hugging Face model with pretrain_data prepared with its tokenizer) is scored on the same
batches: the first eval_iters of one prepared dataset's validation split (pretrain_data, else the first checkpoint's)
and the validation split of each task. Sharpness (sharpness.py): noise (the paper's proxy), hessian (top eigenvalue,
Lanczos), trace (Hutchinson), sam (L(w + e) - L(w)). Benchmarks: lm-evaluation-harness on the model in memory
(docs/ecosystem.md). out is rewritten atomically after each checkpoint. The measures, their costs and the JSON
fields: docs/measurement.md.
"""
import math
import os
import sys
import time

import keys
from checkpoint import build_model, load_checkpoint, load_model, write_json
from config import check, config_defaults, fail, load_config
from data import load_meta, load_tokenizer, open_tokens, tokenizer_id, val_batch
from hf import hf_as_checkpoint, is_hf_source
from sharpness import hessian_trace, noise_proxy, sam_sharpness, top_hessian_eigenvalue
from training import autocast_context, estimate_loss, setup_device

# -----------------------------------------------------------------------------
checkpoints = ''  # comma-separated checkpoint paths (or Hugging Face models: hf:NAME, directories)
hf_revision = ''  # for hf:NAME checkpoints: Hub branch, tag or commit ('' = main)
out = 'out/eval.json'
overwrite = False  # allow replacing an existing out
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
noise_scaling = 'absolute'  # 'absolute' | 'relative' (docs/measurement.md says why absolute)
hessian_iters = 20
hessian_tol = 1e-3
trace_samples = 10
sam_rho = 0.05
seed = 1337  # noise directions, Lanczos start vector, Hutchinson probes (and lm-eval's few-shot sampling)
# benchmarks with lm-evaluation-harness (optional package lm-eval)
lm_eval_tasks = ''  # comma-separated lm-eval task or group names, e.g. arc_challenge,hellaswag
lm_eval_num_fewshot = -1  # -1 = each task's default
lm_eval_limit = 0  # examples per task; 0 = all
lm_eval_batch_size = 16
lm_eval_include_path = ''  # a directory of extra task YAMLs
lm_eval_builtin_tasks = True  # False: only lm_eval_include_path's tasks (saves indexing lm-eval's ~15k task files)
lm_eval_score_metrics = ('acc_norm', 'acc', 'exact_match', 'f1')  # a task's score: the first of these it reports
device = 'auto'
dtype = 'float32'  # losses only ('bfloat16' autocast); sharpness is always float32
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.EVALUATE)
globals().update(config)
MEASURES = ('noise', 'hessian', 'trace', 'sam')
paths = [p.strip() for p in checkpoints.split(',') if p.strip()]
task_names = [t.strip() for t in tasks.split(',') if t.strip()]
measures = [m.strip() for m in sharpness.split(',') if m.strip()]
check(paths, "checkpoints must list at least one checkpoint (--checkpoints='out/a/ckpt.pt,out/b/ckpt.pt')")
check(len(set(paths)) == len(paths), "checkpoints lists a checkpoint twice")
for m in measures:
    check(m in MEASURES, f"unknown sharpness measure {m!r}; use a comma-separated subset of {', '.join(MEASURES)}")
check(not os.path.isdir(out), f"out {out} is a directory; give a file path such as out/eval.json")
check(overwrite or not os.path.exists(out), f"{out} exists: pick another --out or pass --overwrite=True")
lm_tasks = [t.strip() for t in lm_eval_tasks.split(',') if t.strip()]
check(not lm_eval_include_path or os.path.isdir(lm_eval_include_path),
      f"lm_eval_include_path {lm_eval_include_path} is not a directory")
if lm_tasks:
    try:
        import lm_eval
        import lm_eval.tasks
        from lm_eval.models.huggingface import HFLM
        import transformers
    except ImportError as e:
        fail(f"lm_eval_tasks needs the optional packages lm-eval and transformers ({e}); "
             f"pip install -r requirements-hf.txt")
    import logging
    for name in ('lm-eval', 'lm_eval', 'transformers'):  # per-request warnings; errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    task_manager = lm_eval.tasks.TaskManager(include_path=lm_eval_include_path or None,
                                             include_defaults=lm_eval_builtin_tasks)
    unknown = [t for t in lm_tasks if t not in task_manager.all_tasks]
    if unknown:
        fail(f"lm-eval knows no task {unknown[0]!r} (lm_eval --tasks list shows them; lm_eval_include_path adds a "
             f"directory of task YAMLs)")

# checkpoints and data: all validated before any work ------------------------
infos = {}
def load_source(path):
    """The checkpoint dict of one of ours, or of a Hugging Face model (hf.py; it needs pretrain_data)."""
    if is_hf_source(path):
        return hf_as_checkpoint(path, hf_revision, pretrain_data, 'checkpoints')
    return load_checkpoint(path)


for path in paths:
    ckpt = load_source(path)  # fails on missing / corrupt; the model itself is loaded later, one at a time
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
enc = load_tokenizer(meta) if task_names or lm_tasks else None
if lm_tasks:
    from hf import hf_tokenizer, to_transformers
if task_names:
    import tasks as task_lib  # only when asked for: pretraining-only evaluation needs none of its dependencies
    for task in task_names:
        # the validation split does not depend on seed (tasks.py draws it from its own fixed stream)
        x, y, mask = task_lib.task_tensors(task, 'val', enc, block_size, max_tokens=val_tokens, seed=1337,
                                           source=source)
        check(len(x) > 0 and mask.any(), f"task {task} has an empty validation set")
        task_data[task] = (x, y, mask)


def lm_eval_scores(model):
    """lm-evaluation-harness on our model (see the docstring): {score, scores, results, settings}."""
    lm = HFLM(pretrained=to_transformers(model, enc), tokenizer=hf_tokenizer(enc), batch_size=lm_eval_batch_size,
              max_length=model.config.block_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=lm_tasks, task_manager=task_manager, limit=lm_eval_limit or None,
                                     num_fewshot=None if lm_eval_num_fewshot < 0 else lm_eval_num_fewshot,
                                     random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                     fewshot_random_seed=seed, log_samples=False)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, metrics in output['results'].items()}
    scores = {}
    for task in lm_tasks:
        for metric in lm_eval_score_metrics:
            found = [v for k, v in results.get(task, {}).items() if k.split(',')[0] == metric]
            if found:
                scores[task] = found[0]
                break
    return {'score': sum(scores.values()) / len(scores) if scores else None, 'scores': scores, 'results': results,
            'settings': {'tasks': lm_tasks, 'num_fewshot': lm_eval_num_fewshot, 'limit': lm_eval_limit,
                         'score_metrics': list(lm_eval_score_metrics), 'lm_eval_version': lm_eval.__version__}}


def timed(fn, *args, **kwargs):
    start = time.time()
    value = fn(*args, **kwargs)
    return value, time.time() - start


# evaluate ---------------------------------------------------------------------
results = {}
for path in paths:
    info = infos[path]
    if is_hf_source(path):
        source = load_source(path)
        model = build_model(source['model_args'], source['model'], path).to(device).eval()
        del source
    else:
        model, _ = load_model(path, device)  # float32, eval mode
    print(f"{path}: iter {info['iter_num']}" + (f", {info['quantization']['method']}" if info['quantization'] else ''))
    # per batch: the report's intervals on quantization forgetting resample these batches (paired across models)
    batch_losses, seconds = timed(lambda: [estimate_loss(model, lambda _, i=i: val_batches[i], 1, autocast)
                                           for i in range(eval_iters)])
    loss = sum(batch_losses) / eval_iters  # the batches are equal in size and unmasked: estimate_loss's mean
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
        def task_batch(i, x=x, y=y, mask=mask):
            return tuple(t[i * batch_size:(i + 1) * batch_size].to(device) for t in (x, y, mask))
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
    if lm_tasks:
        result['lm_eval'], seconds = timed(lm_eval_scores, model)
        result['cost']['lm_eval'] = {'seconds': seconds}
        scores = ', '.join(f'{t} {s:.4f}' for t, s in result['lm_eval']['scores'].items())
        print(f"  lm-eval: {scores or 'no task reports a score metric'} in {seconds:.1f} s")
    results[path] = result
    write_json(results, out)
    del model
print(f"wrote {out}")
