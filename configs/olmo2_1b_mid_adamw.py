# The paper's OLMo-2-1B mid-training, AdamW arm (docs/paper.md, "1B mid-training"): start from the last
# stage-1 checkpoint of allenai/OLMo-2-0425-1B (4T tokens; the one OLMo-2's own stage-2 "ingredients" start from),
# 50B tokens of the stage-2 Dolmino mix at 1024 x 2048 tokens per step, lr 7.45e-5 (stage 1's final lr) decaying
# linearly to 0 with no warmup, weight decay 0.1 except on embeddings, clip 1.0, z-loss 1e-5, bf16 autocast.
#
#   python prepare.py --dataset=dolmino --source=hf:allenai/dolmino-mix-1124 --tokenizer=cl100k_base --max_tokens=...
#   torchrun --standalone --nproc_per_node=8 pretrain.py configs/olmo2_1b_mid_adamw.py
#
# Optimizer state: AI2 publishes the weights only, so the run starts a fresh AdamW state (keep_optimizer_state is
# False; there is nothing to keep) and, as the paper's schedule has none, no warmup. Fidelity: the paper keeps the
# state. A fresh AdamW's first update is lr x sign(g) per coordinate (bias correction makes m/sqrt(v) = g/|g|),
# larger than a warm AdamW's |m|/sqrt(v) < 1 on noisy gradients, until the moments have averaged enough steps
# (beta2 = 0.95: a horizon of ~20 steps). So the first few tens of the 23,842 steps move the weights more than the
# published run's did, identically in the AdamW and SAM arms. If the loss spikes there, --warmup_iters=50 (linear
# from 0) is the conservative alternative; log.jsonl's loss and grad_norm of the first 100 steps tell.
#
# Memory (python memory_budget.py; docs/olmo2.md, "The 1B mid-training configs"): with SAM under plain DDP a GPU
# holds ~35 GiB of model state plus ~10.7 GiB of activations per 2048-token sequence; 2 sequences per micro-step
# (~56 GiB) leave room on an 80 GB GPU, 4 (~77 GiB) do not once the CUDA context and fragmentation are added.
# gradient_accumulation_steps counts micro-steps over all GPUs: 512 x 2 = 1024 sequences on any number of GPUs
# dividing 512 (8 GPUs: 64 micro-steps each).
out_dir = 'out/olmo2_1b_mid_adamw'
init_from = 'hf:allenai/OLMo-2-0425-1B'
hf_revision = 'stage1-step1907359-tokens4001B'
keep_optimizer_state = False
dataset = 'dolmino'
# the checkpoint's shape (init_from decides it; listed so that --init_from=resume checks against it)
n_layer = 16
n_head = 16
n_embd = 2048
n_kv_head = 0
intermediate_size = 8192
vocab_size = 100352
rope_theta = 500000.0
norm_eps = 1e-6
qk_norm = True
norm_position = 'post'
init_std = 0.02
z_loss = 1e-5
# batch: 1024 x 2048 = 2,097,152 tokens per step; 50B tokens = 23,842 steps
block_size = 2048
batch_size = 2
gradient_accumulation_steps = 512
max_iters = 23842
# optimizer and schedule
optimizer = 'adamw'
learning_rate = 7.45e-5
lr_schedule = 'wsd'  # with anneal_fraction 1 and min_lr_ratio 0: linear from learning_rate to 0 over the run
anneal_fraction = 1.0
min_lr_ratio = 0.0
warmup_iters = 0
weight_decay = 0.1
decay_embeddings = False
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0
# evaluation: 80 batches x 2 x 2048 = 328k validation tokens every 500 steps (1B tokens)
eval_interval = 500
eval_iters = 80
log_interval = 10
device = 'auto'
dtype = 'bfloat16'
compile = True
