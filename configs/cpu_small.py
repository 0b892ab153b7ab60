# CPU preset (not a paper setting) for the experiment runner's CPU comparisons: a 262k-parameter model (131k
# non-embedding: 2 layers x 64) on the embedded English Wikipedia leads with a 1024-token BPE
# (python prepare.py --dataset=wiki_en_1k --vocab_size=1024: 1.80M training tokens). It is this small so that it
# sees many tokens per parameter on a CPU (the paper's SAM advantage grows with them) and so that the hundreds of
# fine-tuning runs of a learning-rate sweep take seconds each. The experiment configs set max_iters (tokens).
out_dir = 'out/cpu_small'
dataset = 'wiki_en_1k'
n_layer = 2
n_head = 2
n_embd = 64
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 1000  # x 4096 tokens per step
warmup_iters = 50
learning_rate = 3e-3
lr_schedule = 'cosine'
eval_interval = 250
eval_iters = 16  # 16 x 32 x 128 = 65k of the 93k validation tokens
log_interval = 25
device = 'cpu'
dtype = 'float32'
compile = False
