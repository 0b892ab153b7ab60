"""Re-analyses the 3-seed, 6-learning-rate CPU run (cpu_seeds_results.json, written by an earlier version of the
report) with today's statistics: both % less figures with bootstrap intervals (docs/statistics.md).

    python docs/cpu_seeds_reanalysis.py      # -> docs/cpu_seeds_reanalysis.json
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from analysis import bootstrap, quantization_figures, resample_batches, resample_runs, sft_figures  # noqa: E402
from checkpoint import write_json  # noqa: E402

with open(os.path.join(HERE, 'cpu_seeds_results.json')) as f:
    results = json.load(f)
seeds = ('1337', '1338', '1339')
# each model's points are in the sweep's learning-rate order (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2), as resampling needs
runs = [{task: {model: ([tuple(p) for p in per_seed[seed]['points'][model]],
                        results['bases'][model][seed]['pt_val_loss']) for model in per_seed[seed]['points']}
         for task, per_seed in results['sft'].items()} for seed in seeds]
out = {}
for other in ('sam', 'large_lr', 'short_anneal'):
    figures = lambda s: sft_figures(s, 'adamw', other)  # noqa: E731
    boot = bootstrap(runs, figures, resample_runs)
    out[other] = {'sft': {key: {'matched': [v[0][0], v[1][0], v[2][0]], 'area': [v[0][1], v[1][1], v[2][1]]}
                          for key, v in boot.items()},
                  'per_seed_mean': {seed: dict(zip(('matched', 'area'), figures([r])['mean']))
                                    for seed, r in zip(seeds, runs)},
                  'quantization': {}}
    for method in ('nf4', 'fp4'):  # one number per seed (no per-batch losses then): the seeds are what is resampled
        per_seed = [{m: [results['bases'][m][seed]['quantized'][method]['forgetting']] for m in ('adamw', other)}
                    for seed in seeds]
        out[other]['quantization'][method] = list(bootstrap(per_seed, lambda s: quantization_figures(s, 'adamw', other),
                                                            resample_batches)['%'])
write_json(out, os.path.join(HERE, 'cpu_seeds_reanalysis.json'))
