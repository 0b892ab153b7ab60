# The paper's 60M model (d 512, 8 layers, 8 heads) with AdamW, GPU scale: 8 GPUs x 32 sequences x 1024 tokens
# = 262,144 tokens per step.
# Default budget 192B tokens; the paper sweeps 12, 24, 48, 96, 192B (max_iters = tokens / 262144) with peak lr
# 1e-3 up to 24B, 6e-4 for 48-96B and 3e-4 at 192B.
out_dir = 'out/adamw_60m'
dataset = 'dclm'
n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024
batch_size = 32
gradient_accumulation_steps = 8
max_iters = 732422  # 192B tokens
warmup_iters = 2000
learning_rate = 3e-4
lr_schedule = 'cosine'
min_lr_ratio = 0.1
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 2000
eval_iters = 80  # 80 x 32 x 1024 = 2.6M validation tokens
log_interval = 10
compile = True
