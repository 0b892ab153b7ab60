"""
Convert a Hugging Face OLMo-2 checkpoint into one of ours (ckpt.pt), so that finetune.py, quantize.py and
evaluate.py take it like any base model (e.g. the untouched stage-1 checkpoint as a baseline).

    python import_hf.py --init_from=hf:allenai/OLMo-2-0425-1B --hf_revision=stage1-step1907359-tokens4001B \
        --dataset=dolmino --out_dir=out/olmo2_1b_stage1
    python import_hf.py --init_from=path/to/hf_dir --dataset=wiki_en --out_dir=out/x

pretrain.py does not need this step: it takes the same init_from directly. The checkpoint records
data_root/dataset as its pretraining data (finetune.py measures forgetting on its validation split), whose
tokenizer must give the ids the Hugging Face tokenizer gives (checked when the checkpoint has a tokenizer.json).
It holds no optimizer state: none is published.
"""
import os
import sys

import keys
from checkpoint import code_version, save_checkpoint
from config import check, config_defaults, load_config
from data import load_meta
from hf import hf_checkpoint

# -----------------------------------------------------------------------------
init_from = ''  # hf:NAME or a local Hugging Face directory
hf_revision = ''  # with hf:NAME: Hub branch, tag or commit ('' = main)
out_dir = ''
overwrite = False  # allow replacing out_dir/ckpt.pt
data_root = 'data'
dataset = 'wiki_en'  # its pretraining data as prepared by prepare.py (OLMo-2: --tokenizer=cl100k_base)
block_size = 0  # context the checkpoint records; 0 = the model's max_position_embeddings
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.IMPORT_HF)
globals().update(config)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
check(overwrite or not os.path.exists(ckpt_path),
      f"{ckpt_path} exists: pick another --out_dir or pass --overwrite=True")
meta = load_meta(os.path.join(data_root, dataset))
checkpoint = hf_checkpoint(init_from, hf_revision, meta)
check(meta['vocab_size'] <= checkpoint['model_args']['vocab_size'], f"{dataset}'s vocabulary ({meta['vocab_size']}) "
      f"is larger than the model's ({checkpoint['model_args']['vocab_size']})")
if block_size:
    checkpoint['model_args']['block_size'] = block_size
checkpoint.update(config={**config, 'dataset': dataset, 'data_root': data_root}, iter_num=0, tokens=0,
                  dataset=dataset, data_fingerprint=meta.get('fingerprint'), code_version=code_version())
save_checkpoint(checkpoint, ckpt_path)
print(f"{checkpoint['hf_source']} -> {ckpt_path} ({checkpoint['model_args']['n_layer']} layers, "
      f"d {checkpoint['model_args']['n_embd']}, data {os.path.join(data_root, dataset)})")
