# Where does SAM's effect on forgetting appear? AdamW vs SAM (rho 0.05) of one CPU-size model pretrained at four
# budgets, x4 apart: 16, 67, 266 and 1065 tokens per parameter (the authors' records show SAM's fine-tuning advantage
# from roughly 500 tokens per parameter up). Each SAM model is compared with the AdamW model of its own budget.
# Not a paper setting. Hours on 2 cores: start it in the background, it resumes where it stopped.
#
#   nohup python experiment.py configs/experiments/cpu_regime.py > regime.log 2>&1 &
#
# The model: configs/cpu_small.py narrowed to width 32 (98,464 parameters, 32,928 non-embedding), so that 1,000
# tokens per parameter (100M tokens) fits in an afternoon. The embedded corpus holds 1.80M training tokens, so the
# budgets repeat it 0.9, 3.6, 14.6 and 58 times. The repetition control (the `_q` pair) trains the 266-per-parameter
# budget on the first quarter of the corpus only, 58 times over like the largest budget: if its comparison agrees
# with the full-corpus one at 266, repetition is not what drives the largest budget's result.
out_dir = 'out/experiment_regime'
_model = 'configs/cpu_small.py --n_embd=32 --compile=True'
_budgets = {'t16': 400, 't67': 1600, 't266': 6400, 't1065': 25600}  # steps of 4,096 tokens
bases = {}
comparisons = {}
for _name, _steps in _budgets.items():
    _run = f'{_model} --max_iters={_steps} --eval_interval={_steps // 4}'
    bases[f'adamw_{_name}'] = _run
    bases[f'sam_{_name}'] = f'{_run} --optimizer=sam --sam_rho=0.05'
    comparisons[f'sam_{_name}'] = f'adamw_{_name}'
_quarter = f"{_model} --max_iters=6400 --eval_interval=1600 --max_train_tokens=450000"
bases['adamw_t266_q'] = _quarter
bases['sam_t266_q'] = f'{_quarter} --optimizer=sam --sam_rho=0.05'
comparisons['sam_t266_q'] = 'adamw_t266_q'
bases = {'sam_t1065': bases.pop('sam_t1065'), **bases}  # the longest stage first: it bounds the wall time
baseline = 'adamw_t16'
pretrain_args = ''
seeds = (1337,)
# dense near the top, where the matched fine-tuning loss falls
learning_rates = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 1.5e-2)
quantize_methods = ('nf4', 'fp4')
