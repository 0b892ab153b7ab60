"""
Export one of our checkpoints to a Hugging Face directory that transformers loads with
AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained (lm-evaluation-harness, OLMES, vLLM,
BitsAndBytesConfig 4-bit loading).

    python export_hf.py --init_from=out/cpu_sam/ckpt.pt --out_dir=out/cpu_sam_hf
    python export_hf.py --init_from=out/olmo2_1b_mid_sam/ckpt.pt --out_dir=out/olmo2_1b_mid_sam_hf \
        --tokenizer=<the OLMo-2 snapshot directory>      # copy OLMo-2's own tokenizer files

OLMo-2 models (qk_norm, post norm) become Olmo2ForCausalLM, the OLMo-v1-style small models LlamaForCausalLM
(same math: see hf.py). Written: config.json, model.safetensors, the tokenizer files and export.json (where
the weights came from). The directory is built beside out_dir and renamed into place when complete; an
existing out_dir is replaced only with --overwrite=True. With verify=True (default) the exported directory is
loaded back with transformers and its logits compared with ours on random tokens before the rename.
"""
import json
import os
import shutil
import sys
from dataclasses import asdict

import torch

import keys
from checkpoint import code_version, load_model, write_json
from config import check, config_defaults, fail, load_config
from data import get_named_encoding, load_meta, load_tokenizer, tokenizer_id
from hf import TOKENIZER_FILES, atomic_dir, check_tokenizer, export_state, hf_config, write_tokenizer

# -----------------------------------------------------------------------------
init_from = ''  # one of our checkpoints (pretrain.py's, finetune.py's, quantize.py's)
out_dir = ''
overwrite = False  # allow replacing an existing out_dir
dtype = 'float32'  # 'float32' (exact) | 'bfloat16' (half the size; what OLMo-2's bf16 copies hold)
tokenizer = ''  # '' = the checkpoint's own (its training data's tokenizer file, or its named tiktoken encoding);
# a prepared dataset directory; a Hugging Face directory whose tokenizer files are copied (checked against the
# checkpoint's data when that is at hand); 'skip' = no tokenizer files
verify = True  # reload with transformers and compare logits before putting the directory in place
# -----------------------------------------------------------------------------
config = load_config(config_defaults(globals()), sys.argv[1:], keys.EXPORT_HF)
globals().update(config)
check(overwrite or not os.path.exists(out_dir), f"{out_dir} exists: pick another --out_dir or pass --overwrite=True")
try:
    import safetensors.torch
    import transformers
except ImportError as e:
    fail(f"export needs the optional packages transformers and safetensors ({e}); pip install -r requirements-hf.txt")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

model, checkpoint = load_model(init_from)
tok_info = checkpoint.get('tokenizer') or {}
base_config = checkpoint.get('config') or {}
data_dir = base_config.get('pretrain_data') or os.path.join(base_config.get('data_root', 'data'),
                                                            base_config.get('dataset', ''))


def data_meta(directory):
    """load_meta of directory if it holds prepared data with this checkpoint's tokenizer, else None."""
    if not os.path.isfile(os.path.join(directory, 'meta.json')):
        return None
    meta = load_meta(directory)
    return meta if tokenizer_id(meta['tokenizer']) == tokenizer_id(tok_info) else None


# the tokenizer: a tiktoken Encoding to convert (enc), or an HF directory to copy (copy_from)
enc, copy_from = None, None
if tokenizer == '':
    if tok_info.get('name') and not tok_info.get('file'):
        enc = get_named_encoding(tok_info['name'])
    elif (meta := data_meta(data_dir)) is not None:
        enc = load_tokenizer(meta)
    else:
        fail(f"the tokenizer of {init_from} is stored with its training data {data_dir}, which is missing or holds "
             f"another tokenizer; pass --tokenizer=<prepared dataset or Hugging Face directory> or --tokenizer=skip")
elif tokenizer == 'skip':
    pass
elif os.path.isfile(os.path.join(tokenizer, 'tokenizer.json')):
    copy_from = tokenizer
    if (meta := data_meta(data_dir)) is not None:
        check_tokenizer(copy_from, meta, copy_from)
    else:
        print(f"note: {data_dir} is not at hand, so {tokenizer}'s tokenizer is copied without checking its ids")
elif os.path.isfile(os.path.join(tokenizer, 'meta.json')):
    meta = load_meta(tokenizer)
    check(not tok_info or tokenizer_id(meta['tokenizer']) == tokenizer_id(tok_info),
          f"{tokenizer} holds another tokenizer than the one {init_from} was trained with")
    enc = load_tokenizer(meta)
else:
    fail(f"tokenizer must be '', 'skip', a prepared dataset directory or a Hugging Face directory with "
         f"tokenizer.json; got {tokenizer!r}")

model_args = asdict(model.config)  # every GPTConfig field, defaults filled in
hf = hf_config(model_args, enc)
if copy_from:  # OLMo-2's own tokenizer files: take its special ids from there
    with open(os.path.join(copy_from, 'tokenizer.json')) as f:
        added = {t['content']: t['id'] for t in json.load(f).get('added_tokens', [])}
    hf.eos_token_id, hf.pad_token_id = added.get('<|endoftext|>'), added.get('<|pad|>')
state = export_state(model)
if dtype == 'bfloat16':
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})  # to compare


def write(directory):
    hf.save_pretrained(directory)
    with open(os.path.join(directory, 'config.json')) as f:
        saved = json.load(f)
    saved['rope_theta'] = model_args['rope_theta']  # transformers < 5 reads only this key (else RoPE theta 1e4)
    saved['torch_dtype'] = dtype
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(saved, f, indent=2)
    safetensors.torch.save_file(state, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
    if enc is not None:
        write_tokenizer(enc, directory)
    for name in TOKENIZER_FILES if copy_from else ():
        if os.path.isfile(os.path.join(copy_from, name)):
            shutil.copyfile(os.path.join(copy_from, name), os.path.join(directory, name))
    write_json({'source': os.path.abspath(init_from), 'iter_num': checkpoint.get('iter_num'),
                'tokens': checkpoint.get('tokens'), 'architecture': hf.architectures[0], 'dtype': dtype,
                'tokenizer': tokenizer or tok_info.get('name'), 'code_version': code_version()},
               os.path.join(directory, 'export.json'))
    if verify:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        idx = torch.randint(0, model_args['vocab_size'], (2, min(32, model_args['block_size'])),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (reloaded(idx).logits - model(idx)[0]).abs().max().item()
        check(diff < 1e-3, f"the exported model's logits differ from ours by {diff:.3g}; nothing was written")
        print(f"verified: transformers' {type(reloaded).__name__} gives our logits (max |diff| {diff:.2e})")


atomic_dir(out_dir, write, overwrite)
print(f"exported {init_from} -> {out_dir} ({hf.architectures[0]}, {dtype}, "
      f"tokenizer: {'copied from ' + copy_from if copy_from else 'converted' if enc is not None else 'none'})")
