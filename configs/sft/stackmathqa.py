# Fine-tuning on StackMathQA math questions and answers (chat; loss on the answers only).
#
# The paper (GPU, small models): math-ai/StackMathQA 'stackmathqa100k' (Q / A), 10M tokens.
#
# Offline stand-in (source='offline', the default here): a mixture of reasoning-gym arithmetic and algebra tasks
# (NOT StackMathQA).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'stackmathqa'
out_dir = 'out/sft_stackmathqa'
