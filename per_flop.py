"""
Forgetting per FLOP for report.py: the training FLOPs each run counted (pretrain.py's log, finetune.py's result.json),
relative to its baseline's, beside its % less forgetting; the report's table of them (figures.plot_flops draws them).
"""
import json
import os

import numpy as np

from report import comparison_pairs, interval_cell, read_json


def last_record_with(path, key):
    """The last line of a JSONL log that holds key, or None."""
    found = None
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                found = record if key in record else found
    except OSError:
        pass
    return found


def training_flops(out_dir, stages, config):
    """Training FLOPs as the runs counted them (pretrain.py's log, finetune.py's result.json: forward/backward tokens
    x FLOPs per token): {row: {seed: {'pretrain': F, 'finetune': {task: mean over the learning-rate sweep}}}}."""
    flops = {}
    for stage in stages.values():
        run = stage['name'].split('/')[1] if '/' in stage['name'] else ''
        if stage['kind'] == 'pretrain':
            record = last_record_with(os.path.join(stage['dir'], 'log.jsonl'), 'train_flops')
            if record:
                base, seed = run.rsplit('_s', 1)
                flops.setdefault(base, {}).setdefault(seed, {'finetune': {}})['pretrain'] = record['train_flops']
        elif stage['kind'] == 'finetune':
            result = read_json(stage['product'])
            if result and result.get('final') and 'compute' in result:
                row, seed = run.rsplit('_s', 1)
                entry = flops.setdefault(row, {}).setdefault(seed, {'finetune': {}})['finetune']
                entry.setdefault(result['task'], []).append(result['compute']['train_flops'])
    for per_seed in flops.values():
        for entry in per_seed.values():
            entry['finetune'] = {task: float(np.mean(v)) for task, v in entry['finetune'].items()}
    return flops


def flops_comparison(results, flops, config):
    """Per compared row (base model or mitigation): its training FLOPs relative to its baseline's (pretraining plus
    one fine-tuning run of the task, mean over seeds; 'mean': over tasks; 4-bit: pretraining alone) beside its % less
    forgetting with the 95% interval (results['comparisons']): the area figure per task and over tasks (the verdict's
    grid-robust figure), the matched one over tasks, and 4-bit. A mitigation keeps its base model, so its 4-bit figure
    is its base's (0 for a mitigation of the baseline)."""
    four_bit = next((m for m in ('nf4', 'fp4') if m in config['quantize_methods']), None)
    pairs = comparison_pairs(config)
    rows = {}
    for row, a in pairs.items():
        base = row.split('+')[0]
        ratios = {}
        for seed in map(str, config['seeds']):
            own, ref = flops.get(base, {}).get(seed, {}), flops.get(a, {}).get(seed, {})
            tuned = flops.get(row, {}).get(seed, {}).get('finetune', {})
            if 'pretrain' not in own or 'pretrain' not in ref:
                continue
            per_task = [(task, (own['pretrain'] + tuned[task]) / (ref['pretrain'] + ref['finetune'][task]))
                        for task in config['tasks'] if task in tuned and task in ref['finetune']]
            for task, ratio in per_task:
                ratios.setdefault(task, []).append(ratio)
            if per_task:
                ratios.setdefault('mean', []).append(float(np.mean([r for _, r in per_task])))
            if four_bit:
                ratios.setdefault(four_bit, []).append(own['pretrain'] / ref['pretrain'])
        sft = results['comparisons'].get(row, {}).get('sft', {})
        percent = {task: sft.get(task, {}).get('area') for task in ('mean', *config['tasks'])}
        if four_bit:
            percent[four_bit] = ([0.0, 0.0, 0.0] if base == a else
                                 results['comparisons'].get(base, {}).get('quantization', {}).get(four_bit))
        rows[row] = {'baseline': a, 'relative_flops': {k: float(np.mean(v)) for k, v in ratios.items()},
                     'percent_less': percent, 'matched_mean': sft.get('mean', {}).get('matched')}
    return {'four_bit': four_bit, 'rows': rows}


def flops_columns(comparison, config):
    """The FLOPs table's and figure's columns: over tasks, each task, 4-bit."""
    return ['mean', *config['tasks']] + ([comparison['four_bit']] if comparison['four_bit'] else [])


def flops_table(comparison, config):
    """Markdown: each row's training FLOPs relative to its baseline (mean over tasks) and % less forgetting with 95%
    intervals: area figure over tasks, matched figure over tasks, area figure per task, 4-bit."""
    columns = flops_columns(comparison, config)
    names = (['tasks (area)', 'tasks (matched)'] + [f'{c} (area)' for c in config['tasks']]
             + columns[1 + len(config['tasks']):])
    lines = ["| row | baseline | training FLOPs / baseline's | " + ' | '.join(f'{c}: % less' for c in names) + ' |',
             '|---' * (3 + len(names)) + '|']
    for row, entry in comparison['rows'].items():
        ratio = entry['relative_flops'].get('mean')
        cells = [f'{ratio:.3f}' if ratio is not None else 'n/a', interval_cell(entry['percent_less'].get('mean')),
                 interval_cell(entry['matched_mean'])]
        cells += [interval_cell(entry['percent_less'].get(c)) for c in columns[1:]]
        lines.append(f"| {row} | {entry['baseline']} | " + ' | '.join(cells) + ' |')
    return lines
