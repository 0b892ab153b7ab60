"""finetune.py's forgetting mitigations: replay_fraction, l2_init (and EWC's Fisher weights), lora_rank. Each equals
a by-hand reference or shows its effect, counts its compute, and resumes bit for bit after a kill."""
import copy
import json
import os

import pytest
import torch

from checkpoint import build_model, load_model
from data import load_meta, load_tokenizer, open_tokens, sample_chunks, train_batch, val_batch
from lora import add_lora, merged_state_dict
from model import GPT, GPTConfig
from tasks import task_tensors
from test_reliability import FINETUNE, assert_same_tensors, checkpoint, kill_at, ok, read_log, without_speed
from training import estimate_loss, lr_at

pytestmark = pytest.mark.usefixtures('one_thread')
# 3 steps of one micro-batch of 4 x 32 tokens (the tiny base model's context)
STEPS, BATCH, BLOCK, LR = 3, 4, 32, 1e-2
SHORT = ['--task=gsm8k', f'--batch_size={BATCH}', '--gradient_accumulation_steps=1', '--val_tokens=1024',
         '--eval_iters=2', '--eval_interval=100', f'--max_tokens={STEPS * BATCH * BLOCK}', f'--learning_rate={LR}',
         '--device=cpu', '--dtype=float32']


def result_of(out):
    with open(os.path.join(out, 'result.json')) as f:
        return json.load(f)


def finetune(fork_script, base, out, *args):
    return ok(fork_script('finetune.py', f'--init_from={base}', f'--out_dir={out}', *SHORT, *args).wait())


@pytest.fixture(scope='module')
def runs(fork_script, tiny_ckpt, tmp_path_factory):
    """runs(*args): out_dir of a SHORT fine-tuning run of tiny_ckpt with args, made once."""
    made = {}

    def get(*args):
        if args not in made:
            made[args] = str(tmp_path_factory.mktemp('run'))
            finetune(fork_script, tiny_ckpt, made[args], *args)
        return made[args]
    return get


def reference_finetune(base, n_replay=0, l2=0.0, ewc=0):
    """finetune.py's SHORT run rebuilt by hand: the task batches plus n_replay pretraining sequences, the loss plus
    l2 x sum(F (w - w_base)^2) with F the mean-1 diagonal Fisher of `ewc` pretraining sequences (1 if ewc=0)."""
    ckpt = torch.load(base, map_location='cpu', weights_only=False)
    data_dir = os.path.join(ckpt['config']['data_root'], ckpt['config']['dataset'])
    meta = load_meta(data_dir)
    pt_train = open_tokens(data_dir, 'train', meta)
    train_x, train_y, train_mask = task_tensors('gsm8k', 'train', load_tokenizer(meta), BLOCK, STEPS * BATCH * BLOCK,
                                                1337, 'offline')
    model = build_model(ckpt['model_args'], ckpt['model'], base)
    w_base = [p.detach().clone() for p in model.parameters()]
    fisher = [torch.ones_like(p) for p in w_base]
    if ewc:
        fisher = [torch.zeros_like(p) for p in w_base]
        for i in range(ewc):
            model.zero_grad()
            model(*train_batch(pt_train, BLOCK, 1, i, 1338))[1].backward()
            fisher = [f + p.grad ** 2 / ewc for f, p in zip(fisher, model.parameters())]
        mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
        fisher = [f / mean for f in fisher]
        model.zero_grad(set_to_none=True)
    adamw = torch.optim.AdamW(model.param_groups(0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for it in range(STEPS):
        for group in adamw.param_groups:
            group['lr'] = lr_at(it, LR, STEPS, 0, 'cosine', min_lr_ratio=0.1)
        rows = torch.tensor(sample_chunks(it * BATCH, BATCH, len(train_x), 1337))
        x, y, mask = train_x[rows], train_y[rows], train_mask[rows]
        if n_replay:
            rx, ry = train_batch(pt_train, BLOCK, n_replay, it * n_replay, 1337)
            mask = torch.cat([mask, torch.ones_like(ry, dtype=mask.dtype)])
            x, y = torch.cat([x, rx]), torch.cat([y, ry])
        model(x, y, loss_mask=mask, loss_only=True)[1].backward()  # the training step's loss path
        with torch.no_grad():
            for p, p0, f in zip(model.parameters(), w_base, fisher):
                p.grad += 2 * l2 * f * (p - p0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    return model.state_dict()


@pytest.mark.parametrize('args,n_replay,l2,ewc', [
    (('--replay_fraction=0.5',), 4, 0.0, 0),
    (('--l2_init=30',), 0, 30.0, 0),
    (('--l2_init=30', '--ewc_sequences=6'), 0, 30.0, 6),
])
def test_mitigation_equals_the_reference(runs, tiny_ckpt, args, n_replay, l2, ewc):
    out = runs(*args)
    ours, reference = checkpoint(out)['model'], reference_finetune(tiny_ckpt, n_replay, l2, ewc)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6)
    # and not the plain run: the option changed the training
    assert max((ours[k] - v).abs().max() for k, v in reference_finetune(tiny_ckpt).items()) > 1e-4
    compute = result_of(out)['compute']
    assert compute['fwd_bwd_tokens'] == STEPS * (BATCH + n_replay) * BLOCK + ewc * BLOCK


def test_replay_counts_in_training_not_in_the_learning_metric(runs):
    plain, replay = runs(), runs('--replay_fraction=0.5')
    a, b = result_of(plain), result_of(replay)
    # the metrics are computed on the same task and pretraining validation batches, without replayed text
    assert a['base'] == b['base']
    ckpt = torch.load(os.path.join(replay, 'ckpt.pt'), map_location='cpu', weights_only=False)
    model = build_model(ckpt['model_args'], ckpt['model'], replay)
    meta = load_meta(ckpt['config']['pretrain_data'])
    val_x, val_y, val_mask = task_tensors('gsm8k', 'val', load_tokenizer(meta), BLOCK, 1024, 1337, 'offline')
    n = len(val_x) // BATCH
    ft = estimate_loss(model, lambda i: (val_x[i * BATCH:(i + 1) * BATCH], val_y[i * BATCH:(i + 1) * BATCH],
                                         val_mask[i * BATCH:(i + 1) * BATCH]), n, torch.autocast('cpu', enabled=False))
    assert b['final']['ft_val_loss'] == pytest.approx(ft, abs=1e-6)
    assert b['compute']['fwd_bwd_tokens'] == 2 * a['compute']['fwd_bwd_tokens']
    assert b['compute']['train_flops'] == 2 * a['compute']['train_flops']


def distance_to_base(out, base):
    ours, theirs = checkpoint(out)['model'], torch.load(base, map_location='cpu', weights_only=False)['model']
    return torch.sqrt(sum(((ours[k] - theirs[k]) ** 2).sum() for k in theirs)).item()


def test_large_l2_init_keeps_the_weights_near_the_base(fork_script, tiny_ckpt, tmp_path):
    args = ['--max_tokens=4096', '--learning_rate=3e-3']  # 32 steps
    finetune(fork_script, tiny_ckpt, str(tmp_path / 'plain'), *args)
    finetune(fork_script, tiny_ckpt, str(tmp_path / 'l2'), *args, '--l2_init=1000')
    plain = distance_to_base(str(tmp_path / 'plain'), tiny_ckpt)
    pulled = distance_to_base(str(tmp_path / 'l2'), tiny_ckpt)
    assert pulled < 0.25 * plain, (pulled, plain)


def test_lora_merged_weights_give_the_unmerged_models_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128))
    original = copy.deepcopy(model)
    lora_model = add_lora(model, rank=4, alpha=8)
    adapters = [(name, p) for name, p in lora_model.named_parameters() if p.requires_grad]
    assert adapters and all('lora_' in name for name, _ in adapters)
    assert {name.split('.')[-4] for name, _ in adapters} == {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                                                              'up_proj', 'down_proj'}
    with torch.no_grad():
        for _, p in adapters:  # B starts at 0: make the adapters do something
            p.normal_(std=0.2)
    x = torch.randint(0, 128, (2, 16))
    unmerged = lora_model(x)[0]
    merged = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128))
    merged.load_state_dict(merged_state_dict(lora_model))
    torch.testing.assert_close(merged(x)[0], unmerged, rtol=1e-5, atol=1e-5)
    assert (unmerged - original(x)[0]).abs().max() > 1e-2
    assert any('lora_' in name for name, _ in lora_model.named_parameters())  # merging worked on a copy


def test_lora_run_saves_a_plain_checkpoint_that_changed_only_the_adapted_matrices(runs, tiny_ckpt):
    out = runs('--lora_rank=4')
    model, ckpt = load_model(os.path.join(out, 'ckpt.pt'))  # what quantize.py and evaluate.py load
    base = torch.load(tiny_ckpt, map_location='cpu', weights_only=False)['model']
    for key, value in ckpt['model'].items():
        changed = not torch.equal(value, base[key])
        assert changed == any(m in key for m in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                                 'down_proj')), key
    # the merged model's pretraining loss is the one the unmerged model measured at the end
    meta = load_meta(ckpt['config']['pretrain_data'])
    pt_val = open_tokens(ckpt['config']['pretrain_data'], 'val', meta)
    pt = estimate_loss(model, lambda i: (*val_batch(pt_val, BLOCK, BATCH, i), None), 2,
                       torch.autocast('cpu', enabled=False))
    result = result_of(out)
    assert result['final']['pt_val_loss'] == pytest.approx(pt, abs=1e-5)
    # LoRA's backward computes no weight gradient of the frozen matrices: fewer FLOPs a token than full fine-tuning
    plain = runs()
    assert result['compute']['fwd_bwd_tokens'] == result_of(plain)['compute']['fwd_bwd_tokens']
    assert result['compute']['train_flops'] < 0.8 * result_of(plain)['compute']['train_flops']


@pytest.mark.parametrize('args', [['--replay_fraction=0.3', '--l2_init=10', '--ewc_sequences=4'], ['--lora_rank=4']],
                         ids=['replay_l2_ewc', 'lora'])
def test_killed_mitigation_run_resumes_bit_for_bit(fork_script, tiny_ckpt, tmp_path, args):
    ref, out = str(tmp_path / 'reference'), str(tmp_path / 'run')
    ok(fork_script('finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={ref}', *FINETUNE, *args).wait())
    kill_at(fork_script, tmp_path, 'iter:6', 'finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}', *FINETUNE,
            *args)
    assert checkpoint(out)['iter_num'] == 4
    resume = ('--init_from=resume', f'--out_dir={out}', *FINETUNE, *args)
    ok(fork_script('finetune.py', *resume).wait())
    ours, theirs = checkpoint(out), checkpoint(ref)
    assert ours['iter_num'] == 16 and 'lora' not in ours
    assert_same_tensors(ours['model'], theirs['model'])
    a, b = result_of(out), result_of(ref)
    assert a['config'].pop('out_dir') == out and b['config'].pop('out_dir') == ref
    assert a == b
    assert without_speed(read_log(out)) == without_speed(read_log(ref))
    assert 'already finished' in ok(fork_script('finetune.py', *resume).wait()).stdout


@pytest.mark.parametrize('args', [['--replay_fraction=0.5', '--l2_init=30', '--ewc_sequences=6'], ['--lora_rank=4']],
                         ids=['replay_l2_ewc', 'lora'])
def test_ddp_mitigation_matches_one_process(fork_script, tiny_ckpt, tmp_path, args):
    """2 processes x 1 micro-batch = 1 process x 2: each rank replays its own micro-batch's pretraining sequences,
    the L2/EWC term (and its Fisher) is the same on every rank, LoRA's adapters are all-reduced like any weight."""
    import subprocess
    import sys
    from test_reliability import REPO
    ddp_out, single_out = str(tmp_path / 'ddp'), str(tmp_path / 'single')
    common = [f'--init_from={tiny_ckpt}', *SHORT, '--gradient_accumulation_steps=2', *args]
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(REPO, 'finetune.py'), f'--out_dir={ddp_out}', *common], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ok(fork_script('finetune.py', f'--out_dir={single_out}', *common).wait())
    ddp, single, base = checkpoint(ddp_out), checkpoint(single_out), torch.load(tiny_ckpt, weights_only=False)
    for key, value in single['model'].items():
        torch.testing.assert_close(ddp['model'][key], value, rtol=1e-4, atol=1e-5)
    assert max((value - base['model'][key]).abs().max() for key, value in single['model'].items()) > 1e-4  # trained
    assert result_of(ddp_out)['final'] == pytest.approx(result_of(single_out)['final'], abs=1e-4)
    assert result_of(ddp_out)['compute'] == result_of(single_out)['compute']


@pytest.mark.parametrize('args,message', [
    (['--replay_fraction=1'], 'replay_fraction must be a number >= 0 and < 1'),
    (['--replay_fraction=0.05'], 'adds no sequence'),
    (['--ewc_sequences=4'], 'set l2_init > 0 too'),
    (['--lora_rank=4', '--l2_init=1'], 'only adapters train'),
    (['--lora_rank=-1'], 'lora_rank must be an int >= 0'),
])
def test_bad_mitigation_settings_are_refused(run_script, tiny_ckpt, tmp_path, args, message):
    out = tmp_path / 'out'
    result = run_script('finetune.py', f'--init_from={tiny_ckpt}', f'--out_dir={out}', *SHORT, *args)
    assert result.returncode != 0 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
