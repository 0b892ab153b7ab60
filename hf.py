"""
Hugging Face interop: OLMo-2 checkpoints in, any of our checkpoints out.

In (pretrain.py, finetune.py, quantize.py --init_from=..., evaluate.py --checkpoints=...):
    hf:allenai/OLMo-2-0425-1B     a hub model (with hf_revision=<branch, tag or commit>, e.g. the stage-1
                                  checkpoint stage1-step1907359-tokens4001B); downloaded once into the Hub cache
    path/to/dir                   a local directory holding config.json and *.safetensors (or pytorch_model*.bin)
  model_type 'olmo2' maps onto model.py's OLMo-2 switches (qk_norm, norm_position='post'); 'llama' (what our
  OLMo-v1-style models export to) onto the pre-norm default. Anything the model cannot express exactly (biases,
  tied embeddings, RoPE scaling, another head_dim) stops with one line.

Out (export_hf.py): qk_norm + post norm -> Olmo2ForCausalLM; no QK-norm + pre norm (the paper's OLMo-v1-style
small models) -> LlamaForCausalLM, whose math is the same: pre-norm RMSNorm with a weight, SwiGLU, RoPE with the
rotate-half convention, no biases, untied embeddings (transformers' OlmoForCausalLM uses a weightless LayerNorm,
so it would not match). The logits equality is tested both ways.

Tokenizers: ours are tiktoken Encodings; tiktoken_to_hf rebuilds the same byte-level BPE in Hugging Face
`tokenizers` (vocabulary = ranks, every split of a token a merge ranked by the token, whole-piece lookup first
as tiktoken does), tested to give the same ids.

Needs `safetensors` to read and `transformers` to write (optional dependencies: requirements-hf.txt).
"""
import glob
import json
import os
import re
import shutil
import tempfile

import torch

from config import check, fail
from data import EOT, bytes_to_unicode, load_meta, load_tokenizer, open_tokens

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
HUB_FILES = ['config.json', 'generation_config.json', '*.safetensors', 'model.safetensors.index.json', *TOKENIZER_FILES]

# -----------------------------------------------------------------------------
# names


def is_hf_source(init_from):
    """Whether init_from names a Hugging Face checkpoint (hf:NAME or a directory) rather than one of our files."""
    return init_from.startswith('hf:') or os.path.isdir(init_from)


def hf_names(model_args):
    """{our parameter name: the Hugging Face name} for a model of this shape."""
    post = model_args['norm_position'] == 'post'
    names = {'wte.weight': 'model.embed_tokens.weight', 'norm_f.weight': 'model.norm.weight',
             'lm_head.weight': 'lm_head.weight'}
    for i in range(model_args['n_layer']):
        ours, theirs = f'blocks.{i}.', f'model.layers.{i}.'
        for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') + (('q_norm', 'k_norm') if model_args['qk_norm'] else ()):
            names[f'{ours}attn.{p}.weight'] = f'{theirs}self_attn.{p}.weight'
        for p in ('gate_proj', 'up_proj', 'down_proj'):
            names[f'{ours}mlp.{p}.weight'] = f'{theirs}mlp.{p}.weight'
        # OLMo-2 normalises each sublayer's output; Llama (pre-norm) its input, and calls the MLP's input norm
        # post_attention_layernorm
        attn_norm, mlp_norm = (('post_attention_layernorm', 'post_feedforward_layernorm') if post else
                               ('input_layernorm', 'post_attention_layernorm'))
        names[f'{ours}attn_norm.weight'] = f'{theirs}{attn_norm}.weight'
        names[f'{ours}mlp_norm.weight'] = f'{theirs}{mlp_norm}.weight'
    return names

# -----------------------------------------------------------------------------
# import


def resolve(source, revision=''):
    """The local directory of an HF checkpoint: the directory itself, or the Hub snapshot of hf:NAME."""
    if not source.startswith('hf:'):
        if not os.path.isdir(source):
            fail(f"Hugging Face checkpoint directory not found: {source}")
        if not os.path.isfile(os.path.join(source, 'config.json')):
            fail(f"{source} is not a Hugging Face checkpoint (no config.json)")
        return source
    name = source[3:]
    import logging
    try:
        from huggingface_hub import errors, snapshot_download
    except ImportError:
        fail(f"init_from={source} needs the optional Hugging Face packages: pip install -r requirements-hf.txt")
    logging.getLogger('huggingface_hub').setLevel(logging.ERROR)  # its retry warnings are not our one line
    at = f" at revision {revision!r}" if revision else ''
    try:
        return snapshot_download(name, revision=revision or None, allow_patterns=HUB_FILES)
    except errors.LocalEntryNotFoundError:  # what huggingface_hub raises when the Hub cannot be reached
        fail(f"cannot download {name}{at}: the Hugging Face Hub is unreachable (no internet?) and it is not in "
             f"the local Hub cache; download it where there is internet (huggingface-cli download {name}"
             f"{' --revision ' + revision if revision else ''}) and copy the cache, or pass its directory")
    except errors.RevisionNotFoundError:
        fail(f"{name} has no revision {revision!r} on the Hugging Face Hub")
    except errors.RepositoryNotFoundError:
        fail(f"{name} is not a model on the Hugging Face Hub (or it is private)")
    except Exception as e:
        fail(f"cannot download {name}{at} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def model_args_from_hf(cfg, where):
    """Our GPTConfig fields for an HF config.json dict; one line for anything model.py cannot compute exactly."""
    model_type = cfg.get('model_type')
    if model_type not in ('olmo2', 'llama'):
        fail(f"{where}: model_type {model_type!r} is not supported (olmo2, or llama as our OLMo-v1-style export)")
    rope = cfg.get('rope_parameters') or cfg.get('rope_scaling') or {}
    theta = rope.get('rope_theta', cfg.get('rope_theta', 10000.0))
    n_embd, n_head = cfg['hidden_size'], cfg['num_attention_heads']
    n_kv_head = cfg.get('num_key_value_heads') or n_head
    problems = [
        (cfg.get('hidden_act', 'silu') != 'silu', f"hidden_act {cfg.get('hidden_act')!r} (only silu/SwiGLU)"),
        (cfg.get('attention_bias') or cfg.get('mlp_bias'), "biases"),
        (cfg.get('tie_word_embeddings', False), "tied input/output embeddings"),
        (rope.get('rope_type', rope.get('type', 'default')) != 'default', f"RoPE scaling {rope}"),
        (cfg.get('head_dim') not in (None, n_embd // n_head), f"head_dim {cfg.get('head_dim')} != hidden/heads"),
        (n_embd % n_head or n_head % n_kv_head, f"{n_head} heads / {n_kv_head} kv heads for width {n_embd}"),
    ]
    for bad, what in problems:
        if bad:
            fail(f"{where}: {what} cannot be expressed by model.py")
    return {'block_size': cfg.get('max_position_embeddings', 4096), 'vocab_size': cfg['vocab_size'],
            'n_layer': cfg['num_hidden_layers'], 'n_head': n_head, 'n_embd': n_embd,
            'n_kv_head': 0 if n_kv_head == n_head else n_kv_head, 'intermediate_size': cfg['intermediate_size'],
            'rope_theta': float(theta), 'norm_eps': float(cfg.get('rms_norm_eps', 1e-6)),
            'qk_norm': model_type == 'olmo2', 'norm_position': 'post' if model_type == 'olmo2' else 'pre',
            'init_std': float(cfg.get('initializer_range', 0.02))}


def read_hf_weights(directory):
    """{name: tensor} of every weight file in directory (safetensors preferred, else pytorch_model*.bin)."""
    files = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
    bins = sorted(glob.glob(os.path.join(directory, 'pytorch_model*.bin')))
    if not files and not bins:
        fail(f"{directory} holds no weights (*.safetensors or pytorch_model*.bin)")
    tensors = {}
    if files:
        try:
            from safetensors.torch import load_file
        except ImportError:
            fail(f"{directory} holds safetensors weights: pip install -r requirements-hf.txt")
    try:
        if files:
            for f in files:
                tensors.update(load_file(f))
        else:
            for f in bins:
                tensors.update(torch.load(f, map_location='cpu', weights_only=True))
    except Exception as e:
        fail(f"weights in {directory} are unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return tensors


def check_tokenizer(directory, meta, where, max_docs=64):
    """Stop unless the HF tokenizer in directory encodes the data's validation documents to the ids they hold
    (prepare.py stored them with the data's own tokenizer). Documents holding the literal text of one of its added
    tokens are left out: OLMo-2's tokenizer makes e.g. |||EMAIL_ADDRESS||| one token, prepare.py (tiktoken's
    encode_ordinary) several. Returns False when directory has no tokenizer.json."""
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
        return False
    from tokenizers import Tokenizer
    try:
        hf = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        fail(f"{path} is not a tokenizer file that tokenizers can read ({why})")
    enc = load_tokenizer(meta)
    added = [t.content for t in hf.get_added_tokens_decoder().values()]
    tokens = open_tokens(meta['data_dir'], 'val', meta)[:200_000].tolist()
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == meta['eot_token']:
            docs.append(tokens[start:i])
            start = i + 1
            if len(docs) == max_docs:
                break
    for ids in docs:
        text = enc.decode(ids)
        if any(a in text for a in added):
            continue
        if hf.encode(text, add_special_tokens=False).ids != ids:
            fail(f"the tokenizer of {where} encodes {meta['data_dir']}'s text to other ids than the data holds; "
                 f"prepare the data with the checkpoint's tokenizer (OLMo-2: --tokenizer=cl100k_base)")
    return True


def hf_checkpoint(source, revision='', meta=None):
    """An HF checkpoint as a dict shaped like ours ('model', 'model_args', ...) for pretrain.py / finetune.py.
    With meta (the training data's load_meta), its tokenizer must give the data's ids (checked when the
    checkpoint has a tokenizer.json); the dict then carries the data's tokenizer entry."""
    from model import GPT, GPTConfig
    directory = resolve(source, revision)
    where = source + (f'@{revision}' if revision else '')
    try:
        with open(os.path.join(directory, 'config.json')) as f:
            cfg = json.load(f)
        assert isinstance(cfg, dict)
    except (OSError, ValueError, AssertionError) as e:
        fail(f"{where}: config.json is unreadable ({type(e).__name__})")
    try:
        model_args = model_args_from_hf(cfg, where)
    except (KeyError, TypeError) as e:
        fail(f"{where}: config.json lacks or garbles {e}")
    names, tensors = hf_names(model_args), read_hf_weights(directory)
    with torch.device('meta'):  # shapes only
        shapes = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**model_args)).state_dict().items()}
    state = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            fail(f"{where}: weight {theirs} is missing")
        if tuple(tensors[theirs].shape) != shapes[ours]:
            fail(f"{where}: {theirs} has shape {tuple(tensors[theirs].shape)}, config.json implies {shapes[ours]}")
        state[ours] = tensors.pop(theirs).float()
    extra = [k for k in tensors if not k.endswith('rotary_emb.inv_freq')]  # old exports saved RoPE buffers
    if extra:
        fail(f"{where}: unexpected weights ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
    tokenizer = None
    if meta is not None:
        if not check_tokenizer(directory, meta, where):
            print(f"note: {where} has no tokenizer.json; trusting that {meta['data_dir']} uses its tokenizer")
        tokenizer = meta['tokenizer']
    return {'model': state, 'model_args': model_args, 'config': {}, 'tokenizer': tokenizer, 'hf_source': where}


def hf_as_checkpoint(source, revision, pretrain_data, key='init_from'):
    """hf_checkpoint for the scripts that take any checkpoint (finetune.py, quantize.py, evaluate.py): pretrain_data, a
    dataset prepared with the model's tokenizer, is required (the tokenizer is checked against it) and recorded as our
    checkpoints record their data, so later stages find the tokenizer and the forgetting data as they do for ours."""
    check(pretrain_data, f"{key}={source} is a Hugging Face checkpoint: pass --pretrain_data=<a dataset prepared with "
          f"its tokenizer> (OLMo-2: prepare.py --tokenizer=cl100k_base)")
    meta = load_meta(pretrain_data)
    checkpoint = hf_checkpoint(source, revision, meta)
    data_root, dataset = os.path.split(os.path.normpath(pretrain_data))
    checkpoint.update(config={'data_root': data_root, 'dataset': dataset}, dataset=dataset,
                      data_fingerprint=meta.get('fingerprint'))
    return checkpoint

# -----------------------------------------------------------------------------
# export


def hf_config(model_args, enc=None):
    """A transformers config (Olmo2Config or LlamaConfig) computing exactly what model.py computes."""
    import transformers
    if model_args['qk_norm'] and model_args['norm_position'] == 'post':
        kind = transformers.Olmo2Config
    elif not model_args['qk_norm'] and model_args['norm_position'] == 'pre':
        kind = transformers.LlamaConfig
    else:
        fail(f"no transformers class has qk_norm={model_args['qk_norm']} with norm_position="
             f"{model_args['norm_position']!r} (Olmo2: both on; Llama: both off)")
    special = getattr(enc, '_special_tokens', {}) if enc is not None else {}
    n_head = model_args['n_head']
    return kind(vocab_size=model_args['vocab_size'], hidden_size=model_args['n_embd'],
                intermediate_size=model_args['intermediate_size'] or 4 * model_args['n_embd'],
                num_hidden_layers=model_args['n_layer'], num_attention_heads=n_head,
                num_key_value_heads=model_args['n_kv_head'] or n_head, hidden_act='silu',
                max_position_embeddings=model_args['block_size'], rms_norm_eps=model_args['norm_eps'],
                rope_theta=model_args['rope_theta'], initializer_range=model_args['init_std'],
                attention_bias=False, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=special.get(EOT), pad_token_id=special.get('<|pad|>'),
                architectures=[kind.__name__.replace('Config', 'ForCausalLM')])


def tiktoken_to_hf(enc):
    """The Hugging Face `tokenizers` Tokenizer that encodes like the tiktoken Encoding enc."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    b2u = bytes_to_unicode()
    ranks = enc._mergeable_ranks

    def spell(token):
        return ''.join(b2u[b] for b in token)
    # tiktoken merges any adjacent pair whose concatenation has the lowest rank, so every split of a token is
    # a merge with that token's priority (ties: the pieces' ranks)
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], spell(a), spell(b)) for a, b in splits]
    merges.sort()
    vocab = {spell(t): r for t, r in ranks.items()}
    vocab.update(enc._special_tokens)  # so that add_special_tokens keeps their ids
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(enc._pat_str)), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in enc._special_tokens])
    return tok


def onig_pattern(pat_str):
    """tiktoken's split regex (Rust fancy-regex) for `tokenizers` (Oniguruma, Ruby syntax), where `{1,3}+` is
    not possessive but 'one or more runs of 1-3' and `$` is any line's end. Dropping the possessive marks
    changes no match of these patterns (nothing after them could be matched by backtracking) and `\\z` is
    fancy-regex's `$`."""
    pat_str = re.sub(r'(?<!\\)([?+*])\+', r'\1', pat_str)  # x?+ x++ x*+ (a quantifier, then +)
    return re.sub(r'(\{\d+(?:,\d*)?\})\+', r'\1', pat_str).replace('$', r'\z')  # x{1,3}+


def hf_tokenizer(enc):
    """transformers' tokenizer for the tiktoken Encoding enc (eos <|endoftext|>)."""
    from transformers import PreTrainedTokenizerFast
    special = enc._special_tokens
    return PreTrainedTokenizerFast(tokenizer_object=tiktoken_to_hf(enc), eos_token=EOT if EOT in special else None,
                                   pad_token='<|pad|>' if '<|pad|>' in special else None, model_max_length=None)


def write_tokenizer(enc, directory):
    """tokenizer.json and tokenizer_config.json for transformers' AutoTokenizer."""
    hf_tokenizer(enc).save_pretrained(directory)


def to_transformers(model, enc=None):
    """Our GPT as the transformers model (Olmo2ForCausalLM / LlamaForCausalLM) that export_hf.py would write, in
    memory: the same weights, float32, eval mode."""
    import transformers
    from dataclasses import asdict
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(asdict(model.config), enc), dtype=torch.float32)
    hf_model.load_state_dict(export_state(model))
    return hf_model.to(next(model.parameters()).device).eval()


def export_state(model):
    """Our model's weights under their Hugging Face names, contiguous, as safetensors wants them."""
    names = hf_names({k: getattr(model.config, k) for k in ('n_layer', 'qk_norm', 'norm_position')})
    state = model.state_dict()
    if set(state) != set(names):
        fail(f"the model's weights {sorted(set(state) ^ set(names))[:3]} have no Hugging Face name")
    return {names[k]: v.detach().contiguous() for k, v in state.items()}


def atomic_dir(out_dir, write, overwrite=False):
    """Run write(tmp_dir) on a fresh directory beside out_dir, then put it at out_dir in one rename
    (an existing out_dir only with overwrite, replaced after the new one is complete)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        fail(f"{out_dir} exists: pick another --out_dir or pass --overwrite=True")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(out_dir) + '.', suffix='.tmp')
    try:
        write(tmp)
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), 'rb+') as fh:
                os.fsync(fh.fileno())
            os.chmod(os.path.join(tmp, f), 0o666 & ~_umask())  # safetensors writes private files
        os.chmod(tmp, 0o777 & ~_umask())  # and mkdtemp private directories
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(out_dir) + '.', suffix='.old')
            os.replace(out_dir, os.path.join(old, 'x'))
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
