# Fine-tuning on GSM8K math word problems (chat; loss on the answers only).
#
# The paper (GPU, small models): openai/gsm8k 'main' (train; val = its test split), all of it
# (~1.2M tokens: max_tokens=10_000_000 runs out first).
#
# Offline stand-in (source='offline', the default here): reasoning-gym gsm_symbolic, chain-of-thought answers (NOT GSM8K).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'gsm8k'
out_dir = 'out/sft_gsm8k'
