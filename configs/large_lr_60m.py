# Large peak learning rate on the paper's 60M recipe: 3e-3, the top of the paper's sweep
# {1e-4, 3e-4, 6e-4, 1e-3, 3e-3} (run at 60M / 192B tokens, where 3e-4 is the tuned default).
from configs.adamw_60m import *

out_dir = 'out/large_lr_60m'
learning_rate = 3e-3
