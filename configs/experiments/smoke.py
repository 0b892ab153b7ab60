# Smoke test of the whole pipeline (about a minute on 2 CPU cores; CI runs it): tiny models, two base models, two
# tasks, two fine-tuning learning rates, one quantization method, cheap sharpness. The numbers mean nothing.

out_dir = 'out/experiment_smoke'
bases = {
    'adamw': 'configs/cpu_small.py --n_layer=1 --n_embd=32',
    'sam': 'configs/cpu_small.py --n_layer=1 --n_embd=32 --optimizer=sam',
}
pretrain_args = '--max_iters=20 --warmup_iters=2 --eval_interval=20 --eval_iters=2 --log_interval=5'
tasks = ('gsm8k', 'starcoder')
learning_rates = (1e-3, 1e-2)
# compiled as the default experiment's are: the stage server compiles each base model once for its runs
finetune_args = ('--block_size=0 --batch_size=16 --max_tokens=8192 --val_tokens=4096 --eval_iters=2 '
                 '--eval_interval=1000 --log_interval=1 --compile=True')
quantize_methods = ('nf4',)
sharpness = 'sam'
evaluate_args = '--batch_size=16 --eval_iters=2 --sharpness_batches=1'

