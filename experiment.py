"""
The whole learning-forgetting comparison in one command: pretrain the base models, fine-tune each on every task at a
sweep of learning rates, quantize them, measure losses and sharpness, and write a report with plots.

    python experiment.py                                     # the default CPU experiment (defaults below)
    python experiment.py configs/experiments/smoke.py        # 1-minute end-to-end check
    python experiment.py configs/experiments/cpu_seeds.py --jobs=2
    python experiment.py configs/experiments/gpu_20m.py      # the paper's 20M grid on a GPU machine

Every stage is one run of a stage script (prepare.py, pretrain.py, finetune.py, quantize.py, evaluate.py) with its
own directory under out_dir holding its outputs, its console output (stage.log) and stage.json, written atomically
when it succeeds. A stage's key hashes its command, the contents of the config files the command names (and those
they import), and the keys of the stages it depends on. A rerun skips stages whose stage.json has the same key and
redoes the others (a changed config redoes what depends on it); a pretraining run that was killed resumes from its
last checkpoint. A failed stage is reported with its log; stages that do not need it go on; report.md marks what is
missing. The report (report.py) is rewritten from the stage outputs at the end of every run.

Hardware: on a CPU, `jobs` stages run at once, each with cpu_count / jobs threads. With several GPUs,
multi_gpu='torchrun' runs pretraining and fine-tuning under torchrun on all of them (one stage at a time), and
multi_gpu='spread' runs one stage per GPU.
"""
import ctypes
import fcntl
import hashlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import keys
from checkpoint import append_jsonl, write_json
from config import (REPO_ROOT, ConfigError, check, config_defaults, fail, load_config, parse_value,
                    read_config_file)
from report import read_json, write_report

# -----------------------------------------------------------------------------
# defaults: the default experiment, a CPU-scale comparison on the embedded offline data (under 20 minutes on 2 cores;
# the README has the measured time). Not a paper setting: four base models of configs/cpu_small.py (262k parameters)
# trained 1000 steps of 32 x 128 tokens (4.1M tokens, 2.3 epochs of wiki_en_1k, 16 tokens per parameter): the AdamW
# baseline and the paper's three flatness interventions. Each is fine-tuned on the five tasks' offline stand-ins
# (100k tokens) at eight learning rates, quantized three ways, and its sharpness measured. One seed; for the spread
# across seeds see configs/experiments/cpu_seeds.py.
out_dir = 'out/experiment'
data_root = 'data'
dataset = 'wiki_en_1k'
prepare_args = '--vocab_size=1024'  # prepare.py arguments (it is a no-op when the dataset is already prepared)
# base models: name -> pretrain.py arguments (config files and --key=value); pretrain_args apply to all of them
bases = {
    'adamw': 'configs/cpu_small.py',
    'sam': 'configs/cpu_small.py --optimizer=sam --sam_rho=0.05',
    'large_lr': 'configs/cpu_small.py --learning_rate=1e-2',  # 3.3x the tuned 3e-3
    'short_anneal': 'configs/cpu_small.py --lr_schedule=wsd --anneal_fraction=0.05',  # WSD: decay over the last 5%
}
# compiled: 1,000 steps earn back the compile time (docs/speed.md); the losses move by float rounding only
pretrain_args = '--max_iters=1000 --eval_interval=250 --compile=True'
baseline = 'adamw'  # the base model the others are compared with
comparisons = {}  # {base: the base it is compared with} where that is not `baseline` (e.g. one baseline per budget)
seeds = (1337,)  # one pretraining run per base model and seed (--seed: initialisation and data order)
# fine-tuning: every base model x seed x task x learning rate
tasks = ('gsm8k', 'stackmathqa', 'starcoder', 'musicpile', 'tulu')
finetune_config = 'configs/sft/{task}.py'  # {task} is replaced by the task name
learning_rates = (3e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 7e-3, 1e-2)  # dense near the top, where the matched loss falls
task_learning_rates = {}  # {task: (lr, ...)} replaces learning_rates for that task
# fine-tuning-time mitigations: {name: (base, finetune.py arguments)} fine-tunes that base again with those arguments
# (same tasks and learning rates), reported as the row "<base>+<name>";
# e.g. {'replay': ('adamw', '--replay_fraction=0.25')}
finetune_mitigations = {}
# the base model's context and batch; 100k tokens = 24 steps; evaluated at the start and the end only
# compiled: the stage server compiles each base model once for all of its runs (stage_server.py)
finetune_args = ('--block_size=0 --batch_size=32 --max_tokens=100000 --val_tokens=32768 --eval_iters=16 '
                 '--eval_interval=1000 --compile=True')
# quantization of every base model (quantize.py --method=...), and evaluate.py's measurements
quantize_methods = ('nf4', 'fp4', 'int8')
quantize_args = ''
sharpness = 'noise,hessian,sam'  # evaluate.py --sharpness, on the base models
evaluate_args = '--batch_size=32 --eval_iters=16'
# forgetting as a benchmark-score drop (the paper's 1B measure): lm-eval tasks scored by evaluate.py on every base,
# fine-tuned and quantized model ('' = off). It only adds benchmark/ stages: the others and their keys stay as they are
lm_eval_tasks = ''
lm_eval_args = ''  # more evaluate.py arguments for them, e.g. --lm_eval_num_fewshot=0 --lm_eval_limit=1000
# tracking of pretraining and fine-tuning (tracking.py): W&B run group = the experiment's out_dir name, job type = the
# stage kind; TensorBoard files in each stage's directory. Not part of the stage keys: switching it redoes nothing.
wandb_log = False
wandb_project = 'flatmin'
tensorboard = False
# hardware
jobs = 2  # stages at once (CPU: each gets cpu_count // jobs threads); 0 = one per GPU if multi_gpu='spread', else 1
multi_gpu = 'torchrun'  # several GPUs: 'torchrun' = pretrain/finetune on all of them | 'spread' = one stage per GPU
stage_server = True  # run stages as forks of stage_server.py, which imports torch and the project once (seconds less
# per stage); False = a fresh interpreter per stage. Stages under torchrun or spread over GPUs always get a fresh one
dry_run = False  # print the stages and their state, run nothing
report_only = False  # rewrite the report from the stage outputs there are, run nothing
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.EXPERIMENT)
globals().update(config)
check(bool(bases) and all(isinstance(k, str) and isinstance(v, str) for k, v in bases.items()),
      "bases must map names to pretrain.py arguments")
check(baseline in bases, f"baseline {baseline!r} is not one of the bases: {', '.join(bases)}")
check(all(a in bases and b in bases and a != b for a, b in comparisons.items()),
      f"comparisons must map a base model to another base model, got {comparisons!r}")
check(all(re.fullmatch(r'[\w.-]+', name) for name in bases), "base names may hold letters, digits, '_', '.', '-'")
for key in ('seeds', 'tasks', 'learning_rates'):
    check(len(set(config[key])) == len(config[key]), f"{key} repeat: {config[key]!r}")
command_lines = {key: config[key] for key in ('prepare_args', 'pretrain_args', 'finetune_args', 'quantize_args',
                                               'evaluate_args', 'lm_eval_args')}
command_lines.update({f'bases[{name!r}]': args for name, args in bases.items()})
for name, args in command_lines.items():
    try:
        shlex.split(args)
    except ValueError as e:  # an unclosed quote
        fail(f"{name} is not a command line ({e}): {args!r}")
check(all(t in tasks for t in task_learning_rates), "task_learning_rates names a task that is not in tasks")
check(all(type(lrs) in (tuple, list) and lrs and all(type(lr) in (int, float) and lr > 0 for lr in lrs)
          for lrs in task_learning_rates.values()),
      "task_learning_rates must map tasks to tuples of learning rates > 0")
check(all(re.fullmatch(r'[\w.-]+', name) and isinstance(m, tuple) and len(m) == 2 and m[0] in bases
          and isinstance(m[1], str) for name, m in finetune_mitigations.items()),
      f"finetune_mitigations must map names (letters, digits, '_', '.', '-') to (a base model, finetune.py arguments), "
      f"got {finetune_mitigations!r}")

n_gpus = torch.cuda.device_count()
if jobs == 0:
    jobs = n_gpus if n_gpus > 1 and multi_gpu == 'spread' else 1
torchrun_gpus = n_gpus if n_gpus > 1 and multi_gpu == 'torchrun' else 0
threads = max(1, (os.cpu_count() or 1) // jobs)
spread_gpus = jobs > 1 and n_gpus > 1  # each stage gets its own CUDA_VISIBLE_DEVICES


# the stages --------------------------------------------------------------------
def config_files(args):
    """Config files named in args and the configs they import (`from configs.x import *`), for the stage key."""
    found, todo = [], [a for a in args if a.endswith('.py') and not a.startswith('--')]
    while todo:
        path = todo.pop()
        full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
        if full in found or not os.path.isfile(full):
            continue
        found.append(full)
        with open(full) as f:
            todo += [os.path.join(REPO_ROOT, *m.split('.')) + '.py' for m in re.findall(r'^from (configs[\w.]*) import',
                                                                                          f.read(), re.M)]
    return found


stages = {}  # name -> {script, args, dir, product, deps, key, kind}


def add_stage(name, kind, script, args, product, deps=()):
    digest = hashlib.sha256(json.dumps([script, args, [stages[d]['key'] for d in deps]]).encode())
    for path in config_files(args):
        with open(path, 'rb') as f:
            digest.update(f.read())
    stage_dir = os.path.join(out_dir, name)
    stages[name] = {'name': name, 'kind': kind, 'script': script, 'args': args, 'dir': stage_dir,
                    'product': os.path.join(stage_dir, product), 'deps': list(deps), 'key': digest.hexdigest()[:16]}


data_args = [f'--data_root={data_root}', f'--dataset={dataset}']
add_stage('prepare', 'prepare', 'prepare.py', data_args + shlex.split(prepare_args), 'prepared.json')
for base, base_args in bases.items():
    for seed in seeds:
        run = f'{base}_s{seed}'
        pt_dir = os.path.join(out_dir, 'pretrain', run)
        add_stage(f'pretrain/{run}', 'pretrain', 'pretrain.py',
                  shlex.split(base_args) + shlex.split(pretrain_args) + data_args + [f'--seed={seed}', f'--out_dir={pt_dir}'],
                  'ckpt.pt', ['prepare'])
        base_ckpt = os.path.join(pt_dir, 'ckpt.pt')
        mitigated = {f'{base}+{name}_s{seed}': args for name, (b, args) in finetune_mitigations.items() if b == base}
        for ft_run, extra_args in {run: '', **mitigated}.items():
            for task_index, task in enumerate(tasks):
                for lr_index, lr in enumerate(task_learning_rates.get(task, learning_rates)):
                    ft_dir = os.path.join(out_dir, 'finetune', ft_run, f'{task}_lr{lr:g}')
                    add_stage(f'finetune/{ft_run}/{task}_lr{lr:g}', 'finetune', 'finetune.py',
                              [finetune_config.format(task=task), *shlex.split(finetune_args),
                               f'--init_from={base_ckpt}', f'--learning_rate={lr}', f'--out_dir={ft_dir}',
                               f'--pretrain_data={data_root}/{dataset}', *shlex.split(extra_args)],
                              'result.json', [f'pretrain/{run}'])
                    stages[f'finetune/{ft_run}/{task}_lr{lr:g}']['sweep_position'] = (lr_index, task_index)
        quantized = []
        for method in quantize_methods:
            q_dir = os.path.join(out_dir, 'quantize', f'{run}_{method}')
            add_stage(f'quantize/{run}_{method}', 'quantize', 'quantize.py',
                      [f'--init_from={base_ckpt}', f'--method={method}', f'--out_dir={q_dir}', *shlex.split(quantize_args)],
                      'ckpt.pt', [f'pretrain/{run}'])
            quantized.append(os.path.join(q_dir, 'ckpt.pt'))
        # the base model with its sharpness; the quantized ones (losses only) on the same batches
        eval_common = [f'--pretrain_data={data_root}/{dataset}', *shlex.split(evaluate_args)]
        add_stage(f'evaluate/{run}', 'evaluate', 'evaluate.py',
                  [f'--checkpoints={base_ckpt}', f'--out={out_dir}/evaluate/{run}/eval.json', f'--sharpness={sharpness}',
                   *eval_common], 'eval.json', [f'pretrain/{run}'])
        if quantized:
            add_stage(f'evaluate/{run}_quantized', 'evaluate', 'evaluate.py',
                      [f"--checkpoints={','.join(quantized)}", f'--out={out_dir}/evaluate/{run}_quantized/eval.json',
                       *eval_common], 'eval.json', [f'quantize/{run}_{m}' for m in quantize_methods])
        if lm_eval_tasks:  # benchmark scores of the base model and of each fine-tuned and quantized model
            finetuned = {f'{task}_lr{lr:g}': os.path.join(out_dir, 'finetune', run, f'{task}_lr{lr:g}', 'ckpt.pt')
                         for task in tasks for lr in task_learning_rates.get(task, learning_rates)}
            benchmarked = [(run, [base_ckpt], [f'pretrain/{run}']),
                           (f'{run}_quantized', quantized, [f'quantize/{run}_{m}' for m in quantize_methods])]
            benchmarked += [(f'{run}/{ft}', [path], [f'finetune/{run}/{ft}']) for ft, path in finetuned.items()]
            for name, checkpoints, deps in benchmarked:
                if checkpoints:
                    add_stage(f'benchmark/{name}', 'evaluate', 'evaluate.py',
                              [f"--checkpoints={','.join(checkpoints)}", f'--out={out_dir}/benchmark/{name}/eval.json',
                               f'--lm_eval_tasks={lm_eval_tasks}', *shlex.split(lm_eval_args), *eval_common],
                              'eval.json', deps)


def launch_order(name):
    """Ready stages start in this order (stage keys do not depend on it): the long ones first (pretraining, then the
    base models' sharpness), so that the experiment ends on short fine-tuning runs; within a base model's sweep, one
    learning rate of every task before the next, so that the stages running at once are different tasks and none
    repeats work another is doing for the cache (finetune.py --cache_dir: task data, the base model's evaluation)."""
    kinds = ('prepare', 'pretrain', 'evaluate', 'quantize', 'finetune')
    return kinds.index(stages[name]['kind']), stages[name].get('sweep_position', ())


def state_of(stage):
    marker = read_json(os.path.join(stage['dir'], 'stage.json')) or {}
    if marker.get('key') == stage['key'] and marker.get('status') == 'done' and os.path.exists(stage['product']):
        return 'done'
    return 'changed' if marker.get('status') == 'done' else 'todo'


def command(stage):
    args = list(stage['args'])
    marker = read_json(os.path.join(stage['dir'], 'stage.json')) or {}
    interrupted = marker.get('key') == stage['key'] and os.path.exists(os.path.join(stage['dir'], 'ckpt.pt'))
    if stage['kind'] in ('pretrain', 'finetune') and interrupted:  # the same run stopped: continue it exactly
        args = [a for a in args if not a.startswith('--init_from=')] + ['--init_from=resume']
    elif stage['kind'] in ('pretrain', 'finetune', 'quantize', 'evaluate'):
        args.append('--overwrite=True')  # leftovers of a changed or failed run
    if stage['kind'] in ('pretrain', 'finetune'):  # tracking: appended here, outside the stage key
        args += ['--wandb_log=True', f'--wandb_project={wandb_project}', f'--wandb_run_name={stage["name"]}',
                 f'--wandb_group={os.path.basename(os.path.abspath(out_dir))}'] if wandb_log else []
        args += [f"--tensorboard_dir={os.path.join(stage['dir'], 'tensorboard')}"] if tensorboard else []
    if stage['kind'] == 'finetune':  # a base model's runs on a task share its data and its evaluation (finetune.py)
        args.append(f'--cache_dir={os.path.join(out_dir, "cache")}')
    launcher = [sys.executable]
    if under_torchrun(stage):
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun_gpus}']
    return launcher + [os.path.join(REPO_ROOT, stage['script'])] + args


def under_torchrun(stage):
    return bool(torchrun_gpus) and stage['kind'] in ('pretrain', 'finetune')


def shown(argv):
    """The command as a user would type it in the repository (for stage.json and the report)."""
    return shlex.join(['python' if a == sys.executable else os.path.relpath(a, REPO_ROOT) if a.startswith(REPO_ROOT + '/')
                       else a for a in argv])


def warm_requests(stage):
    """For the first compiled fine-tuning run of a base model: ask the stage server to compile that model once, so
    that the runs it forks find the code compiled (stage_server.warm_compile: CPU, one thread per stage). Asked as soon
    as the base model is trained, while other pretraining keeps both slots busy: the server forks nothing meanwhile."""
    if stage['kind'] != 'finetune' or stage['deps'][0] in warmed or threads != 1 or n_gpus:
        return []
    settings = stage_settings(stage['args'], ('compile', 'batch_size', 'block_size'))
    if not settings or settings['compile'] is not True or settings['batch_size'] is None:
        return []
    base = stage['deps'][0]
    warmed.add(base)
    return [['warm', stages[base]['product'], settings['batch_size'], settings['block_size'] or 0]]


def tell_server(requests):
    """Writes requests to the stage server, one JSON line each; False if it has died."""
    try:
        for request in requests:
            server.stdin.write((json.dumps(request) + '\n').encode())
        server.stdin.flush()
        return True
    except OSError:
        return False


def stage_settings(args, keys):
    """{key: value} for keys, as a stage's config files and --key=value arguments set them (None: not set), or None
    where they cannot be read (the stage will say why)."""
    settings = dict.fromkeys(keys)
    try:
        for arg in args:
            if arg.startswith('--'):
                key, _, text = arg[2:].partition('=')
                updates = {key: parse_value(text)}
            else:
                updates = read_config_file(arg if os.path.isabs(arg) else os.path.join(REPO_ROOT, arg))
            settings.update((k, v) for k, v in updates.items() if k in settings)
    except ConfigError:
        return None
    return settings


def die_with_parent():
    # a killed runner must not leave stage processes writing into out_dir behind it
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_stage_server():
    """stage_server.py, which forks the stages (it dies with this process, and they with it); its own errors go to
    out_dir/stage_server.log."""
    with open(os.path.join(out_dir, 'stage_server.log'), 'wb') as log:
        return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'stage_server.py'), os.path.abspath(out_dir)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
                                env={**os.environ, 'OMP_NUM_THREADS': str(threads)}, preexec_fn=die_with_parent)


# run -----------------------------------------------------------------------------
os.makedirs(out_dir, exist_ok=True)
lock = open(os.path.join(out_dir, '.lock'), 'w')
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    fail(f"another experiment.py is running in {out_dir}")

states = {name: state_of(stage) for name, stage in stages.items()}
todo = sorted((name for name in stages if states[name] != 'done'), key=launch_order)
stages_to_run = len(todo)
print(f"experiment {out_dir}: {len(stages)} stages, {len(stages) - len(todo)} done, {len(todo)} to run "
      f"({jobs} at a time" + (f", torchrun on {torchrun_gpus} GPUs" if torchrun_gpus else '') + ")")
if dry_run:
    for name in todo:
        print(f"  [{states[name]}] {shown(command(stages[name]))}")
    sys.exit(0)
if report_only:
    print(f"report: {write_report(out_dir, stages, config)}")
    sys.exit(0)

started = time.time()
failed, running, free_slots = {}, {}, list(range(jobs))
server, server_output, exit_codes = None, b'', {}  # stage_server.py; what it wrote in part; stage -> its exit status
warmed = set()  # pretraining stages whose model the server has compiled
overall = tqdm(total=len(todo), desc='experiment', unit='stage', position=0, dynamic_ncols=True)
progress_re = re.compile(rb'(\d+)/(\d+) \[')
while todo or running:
    # launch every stage whose dependencies are done, while slots are free
    for name in list(todo):
        stage = stages[name]
        blocked = [d for d in stage['deps'] if d in failed]
        if blocked:
            todo.remove(name)
            failed[name] = f"not run: {blocked[0]} failed"
            overall.update(1)
            continue
        if not free_slots or any(states[d] != 'done' for d in stage['deps']):
            continue
        todo.remove(name)
        slot = free_slots.pop(0)
        os.makedirs(stage['dir'], exist_ok=True)
        argv = command(stage)
        write_json({'key': stage['key'], 'status': 'running', 'command': shown(argv)},
                   os.path.join(stage['dir'], 'stage.json'))
        env = {'OMP_NUM_THREADS': str(threads)}
        if spread_gpus:
            env['CUDA_VISIBLE_DEVICES'] = str(slot % n_gpus)
        log_path = os.path.join(stage['dir'], 'stage.log')
        if stage_server and server is None and not spread_gpus and not under_torchrun(stage):
            server = start_stage_server()
        with open(log_path, 'wb') as log:  # empty before the stage writes to it
            forked = False  # by the server, which says when the stage ends
            if server and not spread_gpus and not under_torchrun(stage):
                # False if it died (the wait below says so): this stage runs in a fresh interpreter
                forked = tell_server(warm_requests(stage) + [[name, argv[1:], log_path, env]])
            process = None if forked else subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                           env={**os.environ, **env}, preexec_fn=die_with_parent)
        bar = tqdm(total=1, desc=name, position=1 + slot, leave=False, dynamic_ncols=True,
                   bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt}')
        running[name] = (process, log_path, slot, bar, time.time(), argv)
    # wait half a second, or less if the server says a stage ended
    if server and select.select([server.stdout], [], [], 0.5)[0]:
        output = os.read(server.stdout.fileno(), 1 << 16)
        if not output:  # it died, and the stages it ran with it: the rest run in fresh interpreters
            overall.write(f"the stage server died (exit {server.wait()}; see {out_dir}/stage_server.log); "
                          f"the remaining stages run in fresh interpreters")
            exit_codes.update({name: -signal.SIGKILL for name, entry in running.items() if entry[0] is None})
            server, stage_server = None, False
        *lines, server_output = (server_output + output).split(b'\n')
        exit_codes.update(json.loads(line) for line in lines)
    elif not server:
        time.sleep(0.5)
    for name, (process, log_path, slot, bar, t0, argv) in list(running.items()):
        with open(log_path, 'rb') as f:  # the stage's own tqdm bar, as last printed into its log
            f.seek(max(0, os.path.getsize(log_path) - 4096))
            hits = progress_re.findall(f.read())
        if hits:
            bar.total, bar.n = int(hits[-1][1]), int(hits[-1][0])
            bar.refresh()
        returncode = exit_codes.pop(name, None) if process is None else process.poll()
        if returncode is None:
            continue
        bar.close()
        free_slots.append(slot)
        del running[name]
        stage = stages[name]
        if returncode == 0 and stage['kind'] == 'prepare':
            write_json({'data_dir': f'{data_root}/{dataset}'}, stage['product'])  # prepare.py's own output is shared
        ok = returncode == 0 and os.path.exists(stage['product'])
        write_json({'key': stage['key'], 'status': 'done' if ok else 'failed', 'command': shown(argv),
                    'returncode': returncode, 'wall_s': round(time.time() - t0, 2)},
                   os.path.join(stage['dir'], 'stage.json'))
        if ok:
            states[name] = 'done'
            fine_tuning = [stages[n] for n in todo if stages[n]['kind'] == 'finetune' and stages[n]['deps'][0] == name]
            if server and fine_tuning:
                tell_server(warm_requests(fine_tuning[0]))
        else:
            failed[name] = f"exit {returncode}, log {log_path}"
            overall.write(f"FAILED {name}: exit {returncode}; see {log_path}")
        overall.update(1)
overall.close()
if server:  # idle: it exits when its input closes
    server.stdin.close()
    server.wait()

if stages_to_run:  # the wall times of the invocations that ran something, for the report
    append_jsonl(os.path.join(out_dir, 'invocations.jsonl'),
                 {'command': shown([sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:]),
                  'started': time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(started)),
                  'wall_s': round(time.time() - started, 1), 'stages_run': stages_to_run, 'failed': len(failed)})
report_path = write_report(out_dir, stages, config)
print(f"{len(stages) - len(failed)}/{len(stages)} stages done in {time.time() - started:.0f} s; report: {report_path}")
for name, why in failed.items():
    print(f"  missing {name}: {why}", file=sys.stderr)
sys.exit(1 if failed else 0)
