# Fine-tuning on StarCoder Python code (raw text; every token trained).
#
# The paper (GPU, small models): bigcode/starcoderdata data_dir='python' (content; gated: log in to
# the hub first), 10M tokens.
#
# Offline stand-in (source='offline', the default here): this Python's standard-library modules (NOT StarCoder).
# Shared settings (CPU default; the paper's GPU flags): configs/sft/cpu.py.
from configs.sft.cpu import *

task = 'starcoder'
out_dir = 'out/sft_starcoder'
