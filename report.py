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

from analysis import (area_percent_less, bootstrap, frontier, matched_forgetting, percent_less_forgetting,
                      quantization_figures, quantization_forgetting, resample_batches, resample_runs, sft_figures,
                      verdict)
from checkpoint import atomic_path, code_version, write_json

SHARPNESS = {'hessian': ('top Hessian eigenvalue', lambda v: v['top_eigenvalue']),
             'trace': ('Hessian trace', lambda v: v['trace']),
             'sam': ('SAM sharpness', lambda v: v['sharpness']),
             'noise': ('noise proxy: loss increase at sigma 0.02',
                       lambda v: v['loss_increase'][int(np.argmin(np.abs(np.array(v['sigmas']) - 0.02)))])}
BOOTSTRAP_REPLICATES = 1000
PAPER_TASKS = ('starcoder', 'musicpile', 'tulu', 'gsm8k', 'stackmathqa')
VERDICT_WORD = {'less forgetting': 'less', 'more forgetting': 'more', 'no detectable difference': 'n.d.'}


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


def comparison_pairs(config):
    """{base: the base it is compared with}: the experiment's `comparisons`, else every base against `baseline`;
    and each fine-tuning mitigation's row against its own base model."""
    baseline = config['baseline']
    pairs = dict(config.get('comparisons') or {b: baseline for b in config['bases'] if b != baseline})
    return {**pairs, **{row: row.split('+')[0] for row in mitigation_rows(config)}}


def mitigation_rows(config):
    """The fine-tuning-time mitigations' rows, "<base>+<name>" (experiment.py's finetune_mitigations)."""
    return [f'{base}+{name}' for name, (base, _) in config.get('finetune_mitigations', {}).items()]


def collect(out_dir, stages, config):
    """Every number of the report, from the stage outputs that exist: {bases, sft, quantization, comparisons}."""
    bases, seeds, pairs = list(config['bases']), list(config['seeds']), comparison_pairs(config)
    results = {'bases': {}, 'sft': {}, 'quantization': {}, 'comparisons': {}}
    finetunes = {}  # (task, seed) -> base -> {lr: (ft, pt)}, base pt losses
    for stage in stages.values():
        if stage['kind'] != 'finetune':
            continue
        result = read_json(stage['product'])
        if not result or not result.get('final'):
            continue
        run = stage['name'].split('/')[1]
        base, seed = run.rsplit('_s', 1)
        entry = finetunes.setdefault((result['task'], int(seed)), {}).setdefault(base, {'runs': {}, 'base_pt': []})
        entry['runs'][result['learning_rate']] = (result['final']['ft_val_loss'], result['final']['pt_val_loss'])
        entry['base_pt'].append(result['base']['pt_val_loss'])
    batch_increases = {}  # (method, seed) -> base -> per-batch pretraining-loss increase of the quantized model
    for base in bases:
        for seed in seeds:
            run = f'{base}_s{seed}'
            evaluation = {**(read_json(os.path.join(out_dir, 'evaluate', run, 'eval.json')) or {}),
                          **(read_json(os.path.join(out_dir, 'evaluate', f'{run}_quantized', 'eval.json')) or {})}
            base_eval = evaluation.get(os.path.join(out_dir, 'pretrain', run, 'ckpt.pt'))
            if base_eval is None:
                continue
            record = {'pt_val_loss': base_eval['pretrain_val_loss'], 'sharpness': {}, 'quantized': {}}
            if base_eval.get('params') and base_eval.get('tokens'):
                record['tokens_per_parameter'] = base_eval['tokens'] / base_eval['params']['total']
            for measure, value in base_eval['sharpness'].items():
                record['sharpness'][measure] = SHARPNESS[measure][1](value)
            for method in config['quantize_methods']:
                q_eval = evaluation.get(os.path.join(out_dir, 'quantize', f'{run}_{method}', 'ckpt.pt'))
                if q_eval is None:
                    continue
                record['quantized'][method] = {
                    'pt_val_loss': q_eval['pretrain_val_loss'],
                    'forgetting': quantization_forgetting(base_eval['pretrain_val_loss'], q_eval['pretrain_val_loss'])}
                per_batch = [q_eval.get('pretrain_val_batch_losses'), base_eval.get('pretrain_val_batch_losses')]
                batch_increases.setdefault((method, seed), {})[base] = (
                    np.subtract(*per_batch) if all(per_batch) else [record['quantized'][method]['forgetting']])
            results['bases'].setdefault(base, {})[str(seed)] = record
    for (task, seed), models in sorted(finetunes.items()):
        finite = {b: m for b, m in models.items() if any(all(map(math.isfinite, p)) for p in m['runs'].values())}
        base_pt = {b: float(np.mean(m['base_pt'])) for b, m in finite.items()}
        entry = {'threshold': {}, 'forgetting': {}, 'baseline_forgetting': {}, 'percent_less': {},
                 'area_percent_less': {}, 'baseline': {},
                 'points': {b: list(m['runs'].values()) for b, m in models.items()},
                 'learning_rates': {b: list(m['runs']) for b, m in models.items()},
                 'frontier': {b: frontier(list(m['runs'].values())) for b, m in finite.items()},
                 'best_at_largest_lr': [b for b, m in finite.items() if best_at_largest_lr(m['runs'])]}
        for b, a in pairs.items():  # each base model against its baseline alone: the paper compares two models
            if a not in finite or b not in finite:
                continue
            matched = matched_forgetting({a: list(finite[a]['runs'].values()), b: list(finite[b]['runs'].values())},
                                         base_pt)
            f = matched['forgetting']
            entry['threshold'][b], entry['forgetting'][b], entry['baseline_forgetting'][b] = \
                matched['threshold'], f[b], f[a]
            entry['percent_less'][b] = percent_less_forgetting(f[a], f[b])
            entry['area_percent_less'][b] = area_percent_less(list(finite[a]['runs'].values()),
                                                              list(finite[b]['runs'].values()), base_pt[a], base_pt[b])
            entry['baseline'][b] = a
        results['sft'].setdefault(task, {})[str(seed)] = entry
    for method in config['quantize_methods']:
        for seed in seeds:
            f = {b: r[str(seed)]['quantized'][method]['forgetting'] for b, r in results['bases'].items()
                 if method in r.get(str(seed), {}).get('quantized', {})}
            compared = {b: a for b, a in pairs.items() if a in f and b in f}
            if compared:
                results['quantization'].setdefault(method, {})[str(seed)] = {
                    'forgetting': {b: f[b] for b in compared},
                    'baseline_forgetting': {b: f[a] for b, a in compared.items()},
                    'percent_less': {b: percent_less_forgetting(f[a], f[b]) for b, a in compared.items()}}
    for b, a in pairs.items():
        results['comparisons'][b] = compare_with_intervals(finetunes, batch_increases, config, a, b)
    return results


def best_at_largest_lr(runs):
    """True when the sweep's largest learning rate gave the best fine-tuning loss: the frontier's top, where the
    matched loss is read, may lie beyond the sweep."""
    finite = {lr: p for lr, p in runs.items() if all(map(math.isfinite, p))}
    return min(finite, key=lambda lr: finite[lr][0]) == max(runs)


def compare_with_intervals(finetunes, batch_increases, config, a, b):
    """Both % less figures of b against a, with bootstrap intervals (analysis.bootstrap): per task and over tasks
    after fine-tuning, and per quantization method. Only tasks and seeds where both models have runs count."""
    seeds = []
    for seed in config['seeds']:
        runs = {}
        for task in config['tasks']:
            models = finetunes.get((task, seed), {})
            if a in models and b in models:
                lrs = [lr for lr in models[a]['runs'] if lr in models[b]['runs']]  # the same grid, in order
                runs[task] = {m: ([models[m]['runs'][lr] for lr in lrs], float(np.mean(models[m]['base_pt'])))
                              for m in (a, b)}
        if runs:
            seeds.append(runs)
    tasks = set.intersection(*(set(s) for s in seeds)) if seeds else set()
    seeds = [{t: s[t] for t in sorted(tasks)} for s in seeds]
    out = {'baseline': a, 'seeds': len(seeds), 'sft': {}, 'per_seed_mean': {}, 'quantization': {}}
    if tasks:
        figures = lambda s: sft_figures(s, a, b)  # noqa: E731
        boot = bootstrap(seeds, figures, resample_runs, n_boot=BOOTSTRAP_REPLICATES)
        for key, (estimate, low, high) in boot.items():
            out['sft'][key] = {name: [estimate[i], low[i], high[i]] for i, name in enumerate(('matched', 'area'))}
        out['per_seed_mean'] = {str(seed): dict(zip(('matched', 'area'), figures([s])['mean']))
                                for seed, s in zip(config['seeds'], seeds)}
    for method in config['quantize_methods']:
        q_seeds = [batch_increases[(method, seed)] for seed in config['seeds']
                   if a in batch_increases.get((method, seed), {}) and b in batch_increases[(method, seed)]]
        if q_seeds:
            q_seeds = [{m: s[m] for m in (a, b)} for s in q_seeds]
            estimate, low, high = bootstrap(q_seeds, lambda s: quantization_figures(s, a, b), resample_batches,
                                            n_boot=BOOTSTRAP_REPLICATES)['%']
            out['quantization'][method] = [estimate, low, high]
    return out


def interval_cell(figure):
    """'12.0 [6.3, 16.1] less': estimate, 95% interval, and what the interval says."""
    if not figure or not math.isfinite(figure[0]):
        return 'n/a'
    estimate, low, high = figure
    if not (math.isfinite(low) and math.isfinite(high)):
        return f'{estimate:.1f} [no interval]'
    return f'{estimate:.1f} [{low:.1f}, {high:.1f}] {VERDICT_WORD[verdict(low, high)]}'


def summary_lines(results, config):
    """The verdict: each comparison's two % less figures over tasks and its quantization figures, with intervals."""
    pairs = comparison_pairs(config)
    n_seeds = max([c['seeds'] for c in results['comparisons'].values()] or [0])
    source = ('pretraining seeds drawn with replacement, then fine-tuning runs' if n_seeds > 1 else
              'fine-tuning runs only (one pretraining seed: the seed-to-seed spread is not in these intervals)')
    lines = ['## Summary', '',
             '% less forgetting (positive = forgets less than its baseline), mean over tasks, with 95% bootstrap '
             f'intervals ({BOOTSTRAP_REPLICATES} replicates; resampled: {source}; quantization: evaluation batches, '
             'paired). Two figures after fine-tuning: **matched**, the paper\'s, read at one matched fine-tuning '
             'loss (the larger of the two best); **area**, over the whole range of fine-tuning losses both frontiers '
             'cover (area between the frontiers / area under the baseline\'s), which one run more or less near the '
             'top barely moves. `less`/`more`: the interval excludes 0; `n.d.`: no detectable difference.', '',
             '| base | baseline | SFT matched: % less | SFT area: % less | '
             + ' | '.join(f'{m}: % less' for m in config['quantize_methods']) + ' |',
             '|---' * (4 + len(config['quantize_methods'])) + '|']
    notes = []
    for b, a in pairs.items():
        c = results['comparisons'].get(b, {})
        mean = c.get('sft', {}).get('mean', {})
        cells = [interval_cell(mean.get('matched')), interval_cell(mean.get('area'))]
        cells += [interval_cell(c.get('quantization', {}).get(m)) for m in config['quantize_methods']]
        lines.append(f'| {b} | {a} | ' + ' | '.join(cells) + ' |')
        for figure in ('matched', 'area'):  # a subset (one seed) that says the opposite of the whole
            if not mean.get(figure) or verdict(*mean[figure][1:]) == verdict(0, 0):  # nan bounds: no verdict either
                continue
            sign = 1 if mean[figure][1] > 0 else -1
            against = [f'seed {seed}: {v[figure]:.1f}' for seed, v in c['per_seed_mean'].items()
                       if v[figure] * sign < 0]
            if against and len(c['per_seed_mean']) > 1:
                notes.append(f'- {b}, {figure}: the seeds together say {verdict(*mean[figure][1:])}, but '
                             f'{", ".join(against)} alone says the opposite.')
    unbracketed = sorted({(task, b) for task, per_seed in results['sft'].items() for r in per_seed.values()
                          for b in r['best_at_largest_lr']})
    if unbracketed:
        notes.append('- The best fine-tuning loss came from the sweep\'s largest learning rate (the frontier\'s top, '
                     'where the matched loss is read, may lie beyond the sweep): '
                     + ', '.join(f'{b} on {task}' for task, b in unbracketed) + '.')
    lines += [''] + (['Notes:', ''] + notes + [''] if notes else [])
    lines += ['Per task, both figures with intervals:', '',
              '| task | ' + ' | '.join(f'{b}: matched | {b}: area' for b in pairs) + ' |',
              '|---' * (1 + 2 * len(pairs)) + '|']
    for task in config['tasks']:
        cells = [interval_cell(results['comparisons'].get(b, {}).get('sft', {}).get(task, {}).get(figure))
                 for b in pairs for figure in ('matched', 'area')]
        lines.append(f'| {task} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def comparison_table(what, rows, others):
    """Markdown rows: per task (or quantization method) and base model, the forgetting of its baseline and of the
    base model (for fine-tuning, at the pair's matched loss) and % less forgetting (mean ± std over seeds)."""
    lines = [f'| {what} | ' + ' | '.join(f'{b}: F baseline | {b}: F | {b}: % less' for b in others) + ' |',
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
    import figures  # here, not at the top: figures.py, per_flop.py and benchmark_scores.py import this module's helpers
    from benchmark_scores import benchmark_lines, collect_benchmarks
    from per_flop import flops_comparison, flops_table, training_flops
    results = collect(out_dir, stages, config)
    markers = {name: read_json(os.path.join(s['dir'], 'stage.json')) or {} for name, s in stages.items()}
    env = environment()
    invocations = []
    try:
        with open(os.path.join(out_dir, 'invocations.jsonl')) as f:
            invocations = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):  # no record (older runs) or a cut-short line: the report goes without it
        pass
    baseline, others = config['baseline'], list(comparison_pairs(config))
    stage_seconds = {}
    for name, stage in stages.items():
        stage_seconds[stage['kind']] = stage_seconds.get(stage['kind'], 0) + markers[name].get('wall_s', 0)
    results['environment'], results['stage_seconds'] = env, stage_seconds
    has_frontiers = figures.plot_frontiers(results, config, os.path.join(out_dir, 'frontiers.png'))
    has_sharpness = figures.plot_sharpness(results, config, os.path.join(out_dir, 'sharpness.png'))
    has_regime = figures.plot_regime(results, config, os.path.join(out_dir, 'tokens_per_parameter.png'))
    results['flops'] = flops_comparison(results, training_flops(out_dir, stages, config), config)
    has_flops = figures.plot_flops(results['flops'], config, os.path.join(out_dir, 'flops.png'))

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
             f"- Base models: {', '.join(config['bases'])} (baseline {baseline})"
             + (f"; fine-tuning mitigations: {', '.join(mitigation_rows(config))}" if mitigation_rows(config) else '')
             + f"; seeds {list(config['seeds'])}; "
             f"tasks {', '.join(config['tasks'])}; quantization {', '.join(config['quantize_methods'])}", '']
    lines += summary_lines(results, config)
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
    lines += ['Each base model is compared with its baseline alone, as the paper compares two models: the threshold is '
              'the larger of the two best fine-tuning losses, and forgetting F = pretraining val loss on the frontier '
              "there - the base model's own. % less forgetting (positive = forgets less): mean ± std over seeds "
              '[per-seed values].', '']
    lines += comparison_table('task', {task: results['sft'].get(task, {}) for task in config['tasks']}, others)
    lines += ['', '## Forgetting after quantization', '',
              'F = pretraining val loss of the quantized model - that of the base model (same batches); % less than '
              'the baseline: mean ± std over seeds [per-seed values].', '']
    lines += comparison_table('method', {m: results['quantization'].get(m, {}) for m in config['quantize_methods']},
                              others)
    if config.get('lm_eval_tasks'):
        results['benchmarks'] = collect_benchmarks(out_dir, stages, config)
        lines += benchmark_lines(results['benchmarks'], config, others)
    if has_flops:
        lines += ['', '## Forgetting per FLOP', '', '![% less forgetting against training FLOPs](flops.png)', '',
                  'Training FLOPs counted from the runs (forward and backward tokens x FLOPs per token; '
                  'docs/forgetting_per_flop.md), pretraining plus one fine-tuning run of the task, relative to the '
                  "row's baseline (4-bit: pretraining alone); % less forgetting with its 95% bootstrap interval, as in "
                  'the summary: the area figure (grid-robust) over tasks and per task, the matched one over tasks. A mitigation row is compared with its own base model, '
                  'which it keeps: its 4-bit figure is its base\'s.', '']
        lines += flops_table(results['flops'], config)
    if has_regime:
        lines += ['', '## Against pretraining tokens per parameter', '', '![% less forgetting against tokens per '
                  'parameter](tokens_per_parameter.png)', '', 'Each compared pair at its tokens per (total) parameter: '
                  'both figures with their 95% intervals, beside the authors\' published small-scale runs (20M-150M, '
                  'SAM vs AdamW, re-analysed with the same matched-loss rule; docs/authors_records.csv).']
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
