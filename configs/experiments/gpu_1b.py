# The paper's OLMo-2-1B comparison: AdamW vs SAM mid-training from the last stage-1 checkpoint (50B Dolmino tokens,
# configs/olmo2_1b_mid_{adamw,sam}.py), each fine-tuned on the 1B recipe's hub SFT sets and quantized to NF4, with
# forgetting measured as the paper does at this size: the drop in mean benchmark score (lm-evaluation-harness through
# evaluate.py --lm_eval_tasks; analysis.score_drop against the AdamW base model's score). GPU machine, internet.
#
#   python experiment.py configs/experiments/gpu_1b.py
#   python experiment.py configs/experiments/gpu_1b.py --lm_eval_args='--lm_eval_limit=500 --device=cuda'  # cheaper
#
# Not run here (no GPU, no internet). Each benchmark stage runs the whole suite on one model: 2 base models + 2
# quantized + 2 x 4 tasks x 3 learning rates fine-tuned = 28 runs of the suite. The learning rates span the paper's
# range (4e-5 to 2e-4); the three values are our grid.
out_dir = 'out/experiment_1b'
dataset = 'dolmino'
prepare_args = '--source=hf:allenai/dolmino-mix-1124 --tokenizer=cl100k_base --max_tokens=55000000000'
bases = {
    'adamw': 'configs/olmo2_1b_mid_adamw.py',
    'sam': 'configs/olmo2_1b_mid_sam.py',
}
pretrain_args = ''
seeds = (1337,)
tasks = ('metamath', 'stackmathqa', 'tulu', 'musicpile')
learning_rates = (4e-5, 1e-4, 2e-4)
# the paper's 1B SFT: 80M tokens, batch 64 x 2048, weight decay 0; hub data, streamed (tasks.py)
finetune_args = ('--source=hub --max_tokens=80000000 --block_size=2048 --batch_size=2 --gradient_accumulation_steps=32 '
                 '--weight_decay=0 --val_tokens=1048576 --eval_iters=40 --eval_interval=200 --device=cuda --dtype=auto')
quantize_methods = ('nf4',)
quantize_args = ''
sharpness = 'sam'
evaluate_args = '--batch_size=8 --eval_iters=40 --device=cuda'
lm_eval_tasks = 'arc_challenge,hellaswag,mmlu,winogrande,drop,nq_open,agieval,gsm8k,mmlu_pro,triviaqa'
lm_eval_args = '--lm_eval_batch_size=32'
jobs = 1
