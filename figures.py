"""
The experiment report's figures (report.py calls them): frontiers.png, sharpness.png, tokens_per_parameter.png and
flops.png. matplotlib is imported only when a figure is drawn.
"""
import math
import os

import numpy as np

from checkpoint import atomic_path
from per_flop import flops_columns
from report import PAPER_TASKS, SHARPNESS, comparison_pairs, finite_mean, mitigation_rows


def panel_grid(n_panels, ncols, width, height):
    """A figure of n_panels axes, ncols to a row, the unused ones hidden. matplotlib is imported only to draw."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.axis('off')
    return fig, axes.flat[:n_panels]


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)


FLOPS_VIEW_BOTTOM = -100  # % less forgetting: rows below it are named instead of drawn


def plot_flops(comparison, config, path):
    """% less forgetting against relative training FLOPs: panels over tasks, per task and 4-bit, a point per row
    with its 95% interval."""
    columns = flops_columns(comparison, config)
    if not comparison['rows']:
        return False
    fig, axes = panel_grid(len(columns), min(3, len(columns)), 4.6, 3.9)
    for ax, column in zip(axes, columns):
        below = []  # rows far below 0 would squash the others: left out of view, named
        for i, (row, entry) in enumerate(comparison['rows'].items()):
            x, value = entry['relative_flops'].get(column), entry['percent_less'].get(column)
            if x is None or not value or not math.isfinite(value[0]):
                continue
            if value[0] < FLOPS_VIEW_BOTTOM:
                below.append(f'{row} {value[0]:.0f}')
                continue
            bar = ([[max(value[0] - value[1], 0)], [max(value[2] - value[0], 0)]]
                   if all(map(math.isfinite, value)) else None)
            ax.errorbar(x, value[0], yerr=bar, fmt='os^D'[i // 10 % 4], color=f'C{i % 10}', capsize=3, label=row)
        if below:
            ax.text(0.98, 0.02, 'below the view: ' + ', '.join(below), transform=ax.transAxes, ha='right',
                    va='bottom', fontsize=7, color='grey')
        if not ax.has_data():
            ax.text(0.5, 0.5, 'no % less forgetting to show\n(runs missing, or no baseline forgetting)',
                    transform=ax.transAxes, ha='center', va='center', fontsize=8, color='grey')
        ax.axhline(0, color='grey', lw=0.7)
        ax.axvline(1, color='grey', lw=0.7, ls=':')
        ax.set_title(f'{column} (4-bit: pretraining FLOPs)' if column == comparison['four_bit'] else
                     'mean over tasks (area)' if column == 'mean' else f'{column} (area)')
        ax.set_xlabel("training FLOPs / its baseline's")
        ax.set_ylabel('% less forgetting')
    handles = {}  # one legend for all panels: a row may be missing from some
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), fontsize=8, loc='lower center', ncol=min(5, max(1, len(handles))))
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(handles) // 5), 1, 1))
    save_figure(fig, path)
    return True


def plot_frontiers(results, config, path):
    tasks = [t for t in config['tasks'] if t in results['sft']]
    if not tasks:
        return False
    colors = {b: f'C{i % 10}' for i, b in enumerate(list(config['bases']) + mitigation_rows(config))}
    fig, axes = panel_grid(len(tasks), min(3, len(tasks)), 4.6, 3.9)
    for ax, task in zip(axes, tasks):
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
    save_figure(fig, path)
    return True


def plot_sharpness(results, config, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    measures = [m for m in SHARPNESS if any(m in r['sharpness'] for runs in results['bases'].values() for r in runs.values())]
    method = next((m for m in config['quantize_methods'] if m in results['quantization']), None)
    if not measures:
        return False
    pairs = comparison_pairs(config)
    rows = [('SFT: % less forgetting than its baseline,\nmean over tasks', lambda base, seed: 0.0 if base not in pairs
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
    save_figure(fig, path)
    return True


def plot_regime(results, config, path):
    """% less forgetting against pretraining tokens per parameter, ours (one point per compared pair, both figures,
    95% intervals) beside the authors' published small-scale records. Drawn when the pairs span several budgets."""
    pairs = comparison_pairs(config)
    tpp = {b: finite_mean([r.get('tokens_per_parameter') for r in results['bases'].get(b, {}).values()]) for b in pairs}
    if len({round(v) for v in tpp.values() if math.isfinite(v)}) < 2:
        return False
    records = read_authors_records()
    panels = list(config['tasks']) + ['mean'] + [m for m in config['quantize_methods'] if m in ('nf4', 'fp4')]
    fig, axes = panel_grid(len(panels), 4, 4.2, 3.4)
    for ax, panel in zip(axes, panels):
        column = '4bit' if panel in ('nf4', 'fp4') else panel
        for size, marker in (('20M', 'v'), ('60M', 's'), ('150M', '^')):
            rows = [r for r in records if r['size'] == size]
            ys = [np.mean([r[t] for t in PAPER_TASKS]) if column == 'mean' else r.get(column) for r in rows]
            ax.scatter([r['tokens_per_parameter'] for r in rows], ys, marker=marker, color='grey', alpha=0.6, s=18,
                       label=f'authors {size}')
        for offset, (figure, color) in enumerate((('matched', 'C0'), ('area', 'C1'))):
            for b in pairs:
                c = results['comparisons'].get(b, {})
                value = c.get('quantization', {}).get(panel) if panel in ('nf4', 'fp4') else \
                    c.get('sft', {}).get(panel, {}).get(figure)
                if not value or not math.isfinite(tpp[b]) or (panel in ('nf4', 'fp4') and figure == 'area'):
                    continue
                x = tpp[b] * (1.06 if offset else 1 / 1.06)  # the two figures side by side
                if panel == 'mean':  # which pair is which (several may share a budget, e.g. a control)
                    ax.annotate(b, (x, value[0]), fontsize=5, xytext=(3, 0), textcoords='offset points')
                ax.errorbar(x, value[0], yerr=[[max(value[0] - value[1], 0)], [max(value[2] - value[0], 0)]],
                            fmt='o', color=color, ms=4, capsize=2,
                            label=None if b != next(iter(pairs)) else 'ours' if panel in ('nf4', 'fp4') else
                            f'ours, {figure}')
        ax.axhline(0, color='black', lw=0.6)
        ax.set_xscale('log')
        ax.set_title(f'{panel}' + (' (mean over tasks)' if panel == 'mean' else ''))
        ax.set_xlabel('pretraining tokens per parameter')
        ax.set_ylabel('% less forgetting (SAM vs AdamW)')
        ax.set_ylim(max(ax.get_ylim()[0], -150), min(ax.get_ylim()[1], 100))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def read_authors_records():
    """docs/authors_records.csv: the authors' published small-scale runs, re-analysed (docs/paper.md says how)."""
    import csv
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'docs', 'authors_records.csv')) as f:
        return [{k: v if k == 'size' else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
