# Investigation (README, "The CPU result"): does SAM's effect on forgetting change with pretraining tokens per
# parameter, as the paper finds? The default experiment's AdamW and SAM base models trained 4x longer: 4000 steps =
# 16.4M tokens (9.1 epochs of wiki_en_1k, 62 tokens per parameter), one seed, the default fine-tuning sweep.
# Not a paper setting.
out_dir = 'out/experiment_tokens'
bases = {
    'adamw': 'configs/cpu_small.py',
    'sam': 'configs/cpu_small.py --optimizer=sam --sam_rho=0.05',
}
pretrain_args = '--max_iters=4000 --eval_interval=500'
