# Where does SAM's effect on forgetting appear? AdamW vs SAM (rho 0.05) of one CPU-size model pretrained at four
# budgets, x4 apart: 17, 66, 265 and 1,060 tokens per parameter (the authors' records show SAM's fine-tuning
# advantage from roughly 500 tokens per parameter up). Each SAM model is compared with the AdamW model of its own
# budget. Not a paper setting. About two hours on 2 cores: run it in the background; it resumes where it stopped.
#
#   nohup python experiment.py configs/experiments/cpu_regime.py > regime.log 2>&1 &
#
# The model: configs/cpu_small.py narrowed to width 32 on byte-level text (a 258-token vocabulary): 49,440
# parameters, 32,928 of them non-embedding, so 1,000 tokens per parameter (52M tokens) fits in an afternoon and the
# embeddings are not most of the model. Bytes also stretch the embedded corpus to 4.56M training tokens, so the
# budgets see it 0.2, 0.7, 2.9 and 11.5 times. The repetition control (the `_q` pair) trains the 265 budget on the
# first quarter of the corpus, 11.5 times over like the largest budget: if its comparison agrees with the
# full-corpus one at 265, repetition is not what drives the largest budget's result.
out_dir = 'out/experiment_regime'
dataset = 'wiki_en_bytes'
prepare_args = '--vocab_size=258'
_model = 'configs/cpu_small.py --n_embd=32 --vocab_size=258 --compile=True'
_budgets = {'t17': 200, 't66': 800, 't265': 3200, 't1060': 12800}  # steps of 4,096 tokens
bases = {}
comparisons = {}
for _name, _steps in _budgets.items():
    _run = f'{_model} --max_iters={_steps} --eval_interval={_steps // 4}'
    bases[f'adamw_{_name}'] = _run
    bases[f'sam_{_name}'] = f'{_run} --optimizer=sam --sam_rho=0.05'
    comparisons[f'sam_{_name}'] = f'adamw_{_name}'
# the repetition control: the 265 budget on the first quarter of the corpus, repeated 11.5 times like the largest
_quarter = f"{_model} --max_iters=3200 --eval_interval=800 --max_train_tokens=1140000"
bases['adamw_t265_q'] = _quarter
bases['sam_t265_q'] = f'{_quarter} --optimizer=sam --sam_rho=0.05'
comparisons['sam_t265_q'] = 'adamw_t265_q'
# the two longest stages first: they bound the wall time
bases = {'sam_t1060': bases.pop('sam_t1060'), 'adamw_t1060': bases.pop('adamw_t1060'), **bases}
baseline = 'adamw_t17'
pretrain_args = ''
seeds = (1337,)
# dense near the top, where the matched fine-tuning loss falls
learning_rates = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 1.5e-2)
quantize_methods = ('nf4', 'fp4')
