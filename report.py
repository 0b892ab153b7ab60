"""
experiment.py's report: reads the stage outputs under an experiment's out_dir and writes report.md, results.json
(every number in the report) and the figures frontiers.png and sharpness.png.

The analysis is the paper's (analysis.py): per task and seed, each base model's frontier is compared with the
baseline's at their matched fine-tuning loss (two models at a time, as the paper does, so a comparison does not
change when other base models join the experiment); quantization forgetting is the pretraining-loss increase measured by evaluate.py on the same
batches as the unquantized base. "% less forgetting" is computed per seed, then averaged; the spread is the sample
standard deviation across seeds.

Rerunning `python experiment.py <config>` when every stage is done only rewrites the report.
"""
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys

import numpy as np

from analysis import frontier, matched_forgetting, percent_less_forgetting, quantization_forgetting
from checkpoint import atomic_path, code_version, write_json

SHARPNESS = {'hessian': ('top Hessian eigenvalue', lambda v: v['top_eigenvalue']),
             'trace': ('Hessian trace', lambda v: v['trace']),
             'sam': ('SAM sharpness', lambda v: v['sharpness']),
             'noise': ('noise proxy: loss increase at sigma 0.02',
                       lambda v: v['loss_increase'][int(np.argmin(np.abs(np.array(v['sigmas']) - 0.02)))])}


def read_json(path):
    """The JSON in path, or None if it is missing or unreadable (a stage that has not written it yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finite_mean(values):
    """Mean of the finite values (None and nan are runs that could not be compared); nan if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def mean_std(values, fmt='.4f'):
    """'mean ± std (n)' over the finite values; the std is the sample one (n - 1)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return 'n/a'
    if len(values) == 1:
        return format(values[0], fmt)
    return f'{format(np.mean(values), fmt)} ± {format(np.std(values, ddof=1), fmt)} (n={len(values)})'


def percent_cell(values):
    """The % less forgetting cell: mean ± std over seeds, then every seed's value."""
    each = ', '.join('n/a' if v is None or not math.isfinite(v) else f'{v:.0f}' for v in values)
    return f"{mean_std(values, '.1f')} [{each}]"


def collect(out_dir, stages, config):
    """Every number of the report, from the stage outputs that exist: {bases, sft, quantization}."""
    bases, seeds = list(config['bases']), list(config['seeds'])
    results = {'bases': {}, 'sft': {}, 'quantization': {}}
    finetunes = {}  # (task, seed) -> base -> [(ft, pt)], base pt loss
    for stage in stages.values():
        if stage['kind'] != 'finetune':
            continue
        result = read_json(stage['product'])
        if not result or not result.get('final'):
            continue
        run = stage['name'].split('/')[1]
        base, seed = run.rsplit('_s', 1)
        entry = finetunes.setdefault((result['task'], int(seed)), {}).setdefault(base, {'points': [], 'base_pt': []})
        entry['points'].append((result['final']['ft_val_loss'], result['final']['pt_val_loss']))
        entry['base_pt'].append(result['base']['pt_val_loss'])
    for base in bases:
        for seed in seeds:
            run = f'{base}_s{seed}'
            evaluation = {**(read_json(os.path.join(out_dir, 'evaluate', run, 'eval.json')) or {}),
                          **(read_json(os.path.join(out_dir, 'evaluate', f'{run}_quantized', 'eval.json')) or {})}
            base_ckpt = os.path.join(out_dir, 'pretrain', run, 'ckpt.pt')
            base_eval = evaluation.get(base_ckpt)
            if base_eval is None:
                continue
            record = {'pt_val_loss': base_eval['pretrain_val_loss'], 'sharpness': {}, 'quantized': {}}
            for measure, value in base_eval['sharpness'].items():
                record['sharpness'][measure] = SHARPNESS[measure][1](value)
            for method in config['quantize_methods']:
                q_eval = evaluation.get(os.path.join(out_dir, 'quantize', f'{run}_{method}', 'ckpt.pt'))
                if q_eval is not None:
                    record['quantized'][method] = {
                        'pt_val_loss': q_eval['pretrain_val_loss'],
                        'forgetting': quantization_forgetting(base_eval['pretrain_val_loss'], q_eval['pretrain_val_loss'])}
            results['bases'].setdefault(base, {})[str(seed)] = record
    baseline = config['baseline']
    for (task, seed), models in sorted(finetunes.items()):
        finite = {b: m for b, m in models.items() if any(all(map(math.isfinite, p)) for p in m['points'])}
        if baseline not in finite or len(finite) < 2:
            continue
        base_pt = {b: float(np.mean(m['base_pt'])) for b, m in finite.items()}
        entry = {'threshold': {}, 'forgetting': {}, 'baseline_forgetting': {}, 'percent_less': {},
                 'points': {b: m['points'] for b, m in models.items()},
                 'frontier': {b: frontier(m['points']) for b, m in finite.items()}}
        for b in finite:  # each base model against the baseline alone: the paper compares two models at a time
            if b == baseline:
                continue
            matched = matched_forgetting({baseline: finite[baseline]['points'], b: finite[b]['points']}, base_pt)
            f = matched['forgetting']
            entry['threshold'][b], entry['forgetting'][b], entry['baseline_forgetting'][b] = \
                matched['threshold'], f[b], f[baseline]
            entry['percent_less'][b] = percent_less_forgetting(f[baseline], f[b])
        results['sft'].setdefault(task, {})[str(seed)] = entry
    for method in config['quantize_methods']:
        for seed in seeds:
            f = {b: results['bases'][b][str(seed)]['quantized'][method]['forgetting'] for b in bases
                 if method in results['bases'].get(b, {}).get(str(seed), {}).get('quantized', {})}
            if baseline in f:
                others = [b for b in f if b != baseline]
                results['quantization'].setdefault(method, {})[str(seed)] = {
                    'forgetting': {b: f[b] for b in others}, 'baseline_forgetting': {b: f[baseline] for b in others},
                    'percent_less': {b: percent_less_forgetting(f[baseline], f[b]) for b in others}}
    return results


def comparison_table(what, rows, baseline, others):
    """Markdown rows: per task (or quantization method) and base model, the forgetting of the baseline and of the
    base model (for fine-tuning, at the pair's matched loss) and % less forgetting."""
    lines = [f'| {what} | ' + ' | '.join(f'{b}: F {baseline} | {b}: F | {b}: % less' for b in others) + ' |',
             '|---' * (1 + 3 * len(others)) + '|']
    for name, per_seed in rows.items():
        if not per_seed:
            lines.append(f'| {name} |' + ' missing |' * (3 * len(others)))
            continue
        cells = []
        for b in others:
            cells += [mean_std([r['baseline_forgetting'].get(b) for r in per_seed.values()]),
                      mean_std([r['forgetting'].get(b) for r in per_seed.values()]),
                      percent_cell([r['percent_less'].get(b) for r in per_seed.values()])]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def plot_frontiers(results, config, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tasks = [t for t in config['tasks'] if t in results['sft']]
    if not tasks:
        return False
    colors = {b: f'C{i}' for i, b in enumerate(config['bases'])}
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis('off')
    for ax, task in zip(axes.flat, tasks):
        runs = sorted(results['sft'][task].items())
        for seed_index, (seed, res) in enumerate(runs):
            for base, points in res['points'].items():
                xs, ys = zip(*points)
                label = base if seed_index == 0 else None
                ax.scatter(xs, ys, s=12, color=colors[base], alpha=0.45, label=label)
                if base in res['frontier']:
                    fx, fy = zip(*res['frontier'][base])
                    ax.plot(fx, fy, color=colors[base], lw=1.3, alpha=0.85)
            for base, threshold in res['threshold'].items():
                ax.axvline(threshold, color=colors[base], lw=0.7, ls=':')
        # runs far above every frontier (too large a learning rate) would squash the frontiers: leave them out of view
        front_y = [y for _, res in runs for front in res['frontier'].values() for _, y in front]
        front_y = front_y or [y for _, res in runs for points in res['points'].values() for _, y in points]
        all_y = [y for _, res in runs for points in res['points'].values() for _, y in points if math.isfinite(y)]
        top = max(front_y) + 0.25 * (max(front_y) - min(front_y) + 1e-3)
        hidden = sum(y > top for y in all_y)
        if hidden:
            ax.set_ylim(top=top)
            ax.text(0.98, 0.98, f'{hidden} run(s) above the view', transform=ax.transAxes, ha='right', va='top',
                    fontsize=7, color='grey')
        ax.set_title(f'{task} ({len(runs)} seed{"s" if len(runs) > 1 else ""})')
        ax.set_xlabel('fine-tuning val loss (learning)')
        ax.set_ylabel('pretraining val loss (forgetting)')
        ax.legend(fontsize=8, loc='lower left')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
    return True


def plot_sharpness(results, config, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    measures = [m for m in SHARPNESS if any(m in r['sharpness'] for runs in results['bases'].values() for r in runs.values())]
    method = next((m for m in config['quantize_methods'] if m in results['quantization']), None)
    if not measures:
        return False
    baseline = config['baseline']
    rows = [(f'SFT: % less forgetting than {baseline}, mean over tasks', lambda base, seed: 0.0 if base == baseline
             else finite_mean([results['sft'][t][seed]['percent_less'].get(base) for t in results['sft']
                               if seed in results['sft'][t]]))]
    if method:
        rows.append((f'{method} quantization forgetting', lambda base, seed: results['bases'][base][seed]['quantized']
                     .get(method, {}).get('forgetting', np.nan)))
    fig, axes = plt.subplots(len(rows), len(measures), figsize=(4 * len(measures), 3.4 * len(rows)), squeeze=False)
    for (ylabel, forgetting), ax_row in zip(rows, axes):
        for measure, ax in zip(measures, ax_row):
            for i, (base, runs) in enumerate(results['bases'].items()):
                xs = [r['sharpness'].get(measure, np.nan) for r in runs.values()]
                ys = [forgetting(base, seed) for seed in runs]
                ax.scatter(xs, ys, color=f'C{list(config["bases"]).index(base)}', label=base, s=20)
            ax.set_xlabel(SHARPNESS[measure][0])
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
    return True


def environment():
    import torch
    versions = {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__}
    for name in ('bitsandbytes', 'transformers', 'matplotlib'):
        try:  # from the installed metadata: importing bitsandbytes prints warnings on CPU-only machines
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = 'not installed'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {'versions': versions, 'cpu': cpu, 'cpu_count': os.cpu_count(), 'gpus': gpus, 'code_version': code_version()}


def write_report(out_dir, stages, config):
    results = collect(out_dir, stages, config)
    markers = {name: read_json(os.path.join(s['dir'], 'stage.json')) or {} for name, s in stages.items()}
    env = environment()
    invocations = []
    try:
        with open(os.path.join(out_dir, 'invocations.jsonl')) as f:
            invocations = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):  # no record (older runs) or a cut-short line: the report goes without it
        pass
    baseline, others = config['baseline'], [b for b in config['bases'] if b != config['baseline']]
    stage_seconds = {}
    for name, stage in stages.items():
        stage_seconds[stage['kind']] = stage_seconds.get(stage['kind'], 0) + markers[name].get('wall_s', 0)
    results['environment'], results['stage_seconds'] = env, stage_seconds
    has_frontiers = plot_frontiers(results, config, os.path.join(out_dir, 'frontiers.png'))
    has_sharpness = plot_sharpness(results, config, os.path.join(out_dir, 'sharpness.png'))

    lines = [f"# Learning-forgetting experiment: `{out_dir}`", '',
             f"Report written {datetime.datetime.now().isoformat(timespec='seconds')} by "
             f"`{shlex.join(['python'] + sys.argv)}`.", '',
             f"- Hardware: {env['cpu']}, {env['cpu_count']} cores; GPUs: {', '.join(env['gpus']) or 'none'}",
             '- Versions: ' + ', '.join(f'{k} {v}' for k, v in env['versions'].items()) + f"; code {env['code_version']}",
             '- Wall time of each `experiment.py` invocation on this out_dir: ' + ('; '.join(
                 f"`{r['command']}` at {r['started']}: {r['wall_s']:.0f} s ({r['stages_run']} stages run)"
                 for r in invocations) or 'n/a'),
             '- Stage time (sum over stages, all invocations; parallel stages overlap): ' +
             ', '.join(f'{kind} {s:.0f} s' for kind, s in stage_seconds.items()),
             f"- Base models: {', '.join(config['bases'])} (baseline {baseline}); seeds {list(config['seeds'])}; "
             f"tasks {', '.join(config['tasks'])}; quantization {', '.join(config['quantize_methods'])}", '']
    lines += ['## Summary', '', f'% less forgetting than {baseline}, averaged over the tasks (each seed\'s mean over tasks, '
              f'then mean ± std over seeds [per-seed values]), and the number of tasks where the mean over seeds is '
              f'positive; then each quantization method.', '',
              '| base | SFT: % less, mean over tasks | tasks with less forgetting | '
              + ' | '.join(f'{m}: % less' for m in config['quantize_methods']) + ' |',
              '|---' * (3 + len(config['quantize_methods'])) + '|']
    for b in others:
        by_seed = {}
        for per_seed in results['sft'].values():
            for seed, r in per_seed.items():
                by_seed.setdefault(seed, []).append(r['percent_less'].get(b))
        task_means = [finite_mean([r['percent_less'].get(b) for r in per_seed.values()])
                      for per_seed in results['sft'].values()]
        cells = [percent_cell([finite_mean(v) for v in by_seed.values()]),
                 f'{sum(m > 0 for m in task_means)} of {len(task_means)}']
        cells += [percent_cell([r['percent_less'].get(b) for r in results['quantization'].get(m, {}).values()])
                  for m in config['quantize_methods']]
        lines.append(f'| {b} | ' + ' | '.join(cells) + ' |')
    lines += ['']
    lines += ['## Base models', '', '| base | pretraining val loss | ' + ' | '.join(
        SHARPNESS[m][0] for m in SHARPNESS if m in config['sharpness'].split(',')) + ' |',
              '|---' * (2 + sum(m in config['sharpness'].split(',') for m in SHARPNESS)) + '|']
    for base in config['bases']:
        runs = results['bases'].get(base, {}).values()
        cells = [mean_std([r['pt_val_loss'] for r in runs])]
        cells += [mean_std([r['sharpness'].get(m) for r in runs], '.4g') for m in SHARPNESS
                  if m in config['sharpness'].split(',')]
        lines.append(f'| {base} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Mean ± sample standard deviation over seeds; sharpness measured by evaluate.py on the base model.', '']

    lines += ['## Forgetting after fine-tuning, at matched fine-tuning loss', '']
    if has_frontiers:
        lines += ['![learning-forgetting frontiers](frontiers.png)', '',
                  'Each point is one fine-tuning run (one learning rate); lines are the frontiers (lower convex hulls), '
                  'one per base model and seed; a dotted line is the matched fine-tuning loss of that base model and the '
                  'baseline (one per seed).', '']
    lines += [f'Each base model is compared with {baseline} alone, as the paper compares two models: the threshold is '
              f'the larger of the two best fine-tuning losses, and forgetting F = pretraining val loss on the frontier '
              f"there - the base model's own. % less forgetting (positive = forgets less): mean ± std over seeds "
              f'[per-seed values].', '']
    lines += comparison_table('task', {task: results['sft'].get(task, {}) for task in config['tasks']}, baseline, others)
    lines += ['', '## Forgetting after quantization', '',
              f'F = pretraining val loss of the quantized model - that of the base model (same batches); % less than '
              f'{baseline}: mean ± std over seeds [per-seed values].', '']
    lines += comparison_table('method', {m: results['quantization'].get(m, {}) for m in config['quantize_methods']},
                              baseline, others)
    if has_sharpness:
        lines += ['', '## Forgetting against sharpness', '', '![forgetting against sharpness](sharpness.png)', '',
                  'One point per base model and seed.']
    missing = [name for name in stages if markers[name].get('status') != 'done' or markers[name].get('key') != stages[name]['key']]
    lines += ['', '## Missing stages', '']
    lines += [f"- `{name}`: {markers[name].get('status', 'not run')}"
              + (f", log `{os.path.join(stages[name]['dir'], 'stage.log')}`" if markers[name] else '') for name in missing]
    lines += ['- none'] if not missing else []
    lines += ['', '## Stages', '', '<details><summary>every command, with its wall time</summary>', '', '```']
    lines += [f"# {name}: {markers[name].get('wall_s', 'n/a')} s\n{markers[name].get('command', '(not run)')}"
              for name in stages]
    lines += ['```', '', '</details>', '']
    write_json(results, os.path.join(out_dir, 'results.json'))
    path = os.path.join(out_dir, 'report.md')
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines))
    return path
