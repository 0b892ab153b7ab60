# Fine-tuning on MetaMathQA (chat; loss on the responses only).
#
# The paper (GPU, small models): meta-math/MetaMathQA (query / response), 10M tokens. The paper uses it for
# OLMo-2-1B (80M tokens, lr 4e-5..2e-4, batch 64 x 2048, weight decay 0).
#
# There is no offline stand-in: this config needs source='hub' and internet.
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'metamath'
source = 'hub'
out_dir = 'out/sft_metamath'
