# Settings every task config shares (import them with `from configs.sft.cpu import *`).
#
# The paper (GPU, small models): batch 64 x 1024 tokens, AdamW with a fresh state, cosine with 10% warmup to
# 0.1x, weight decay 0.1, the learning rate swept per base model (7-11 values). For that, add:
#   --source=hub --max_tokens=10000000 --block_size=1024 --batch_size=8 --gradient_accumulation_steps=8 \
#   --val_tokens=1048576 --eval_interval=25 --eval_iters=80 --device=cuda --dtype=auto
# (under torchrun the 8 micro-steps are divided among the GPUs).
#
# CPU default below (not a paper setting): sized for the configs/cpu_*.py bases (context 256): 200k tokens =
# 48 steps of 16 x 256, evaluated every 16 steps on 64k task tokens and the whole wiki_en validation split.
# Sweep e.g. --learning_rate in 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, one --out_dir each.
source = 'offline'
max_tokens = 200_000
val_tokens = 65536
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 1e-3
eval_interval = 16
eval_iters = 16
log_interval = 4
device = 'cpu'
dtype = 'float32'
compile = False
