# CPU preset (not a paper setting): a 2.1M-parameter model (1.05M non-embedding) on the embedded English
# Wikipedia leads (python prepare.py), about one epoch of the 1.28M training tokens. Small and fast enough
# to train on a laptop-class CPU in minutes; docs/measurement.md has the measured loss and time.
out_dir = 'out/cpu_adamw'
dataset = 'wiki_en'
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 300  # 300 x 4096 = 1.23M tokens
warmup_iters = 30
learning_rate = 3e-3
lr_schedule = 'cosine'
eval_interval = 50
eval_iters = 16  # 16 x 16 x 256 tokens: the whole validation split
log_interval = 10
device = 'cpu'
dtype = 'float32'
compile = False
