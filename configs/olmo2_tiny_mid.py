# Offline, CPU-sized stand-in for configs/olmo2_1b_mid_sam.py, to exercise the whole path (Hugging Face OLMo-2
# checkpoint -> SAM mid-training with the paper's optimizer settings -> export) without internet; not a paper
# setting. Needs a small OLMo-2 saved by transformers with vocab_size >= the data's and the shape below, e.g. the
# one tests/test_hf.py makes, and the embedded corpus (python prepare.py):
#   python pretrain.py configs/olmo2_tiny_mid.py --init_from=<that directory>
from configs.olmo2_1b_mid_adamw import *

out_dir = 'out/olmo2_tiny_mid'
optimizer = 'sam'  # as configs/olmo2_1b_mid_sam.py
sam_rho = 0.05
init_from = ''
hf_revision = ''
dataset = 'wiki_en'
n_layer = 2
n_head = 4
n_embd = 64
n_kv_head = 2
intermediate_size = 96
vocab_size = 4096
rope_theta = 12345.0
init_std = 0.1  # the test model's initializer_range
block_size = 64
batch_size = 4
gradient_accumulation_steps = 2
max_iters = 8
learning_rate = 3e-3  # 7.45e-5 would barely move a random model in 8 steps
eval_interval = 4
eval_iters = 2
log_interval = 1
device = 'cpu'
dtype = 'float32'
compile = False
