"""Tests for model.py: the OLMo-style GPT (shapes, loss, causality, RoPE, init, OLMo-2 switches, param groups)."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, Attention, Block, GPTConfig, RMSNorm, apply_rope, rope_cache  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

V, D, H, L, T = 64, 32, 4, 2, 16


def tiny_config(**overrides):
    kw = dict(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=D)
    kw.update(overrides)
    return GPTConfig(**kw)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def random_tokens(B=3, T_=T, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T_), generator=g), torch.randint(0, vocab, (B, T_), generator=g)


def manual_rmsnorm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def randomize_norm_gains(module, seed=5):
    """Norm gains start at 1, which would hide a missing multiplication by the gain."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))


# ---------------------------------------------------------------- forward and loss

def test_output_shapes():
    model = tiny_model()
    x, y = random_tokens(B=3, T_=10)
    logits, loss = model(x)
    assert logits.shape == (3, 10, V)
    assert loss is None
    logits, loss = model(x, y)
    assert logits.shape == (3, 10, V)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(AssertionError):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_loss_equals_cross_entropy():
    model = tiny_model()
    x, y = random_tokens()
    logits, loss = model(x, y)
    expected = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # a freshly initialised model predicts close to uniform
    assert abs(loss.item() - math.log(V)) < 0.5


def test_loss_mask_is_mean_over_masked_positions_only():
    model = tiny_model()
    x, y = random_tokens()
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(x.shape, generator=g) < 0.4
    mask[0] = False  # a row with nothing to predict
    mask[1, 3] = True
    logits, loss = model(x, y, loss_mask=mask)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    picked = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    expected = picked[mask].mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    # targets at masked-out positions do not matter
    y2 = y.clone()
    y2[~mask] = (y2[~mask] + 1) % V
    _, loss2 = model(x, y2, loss_mask=mask)
    assert torch.equal(loss, loss2)
    # ... but targets at masked-in positions do
    y3 = y.clone()
    y3[1, 3] = (y3[1, 3] + 1) % V
    _, loss3 = model(x, y3, loss_mask=mask)
    assert not torch.equal(loss, loss3)
    # an all-ones mask is the plain mean
    _, loss_all = model(x, y, loss_mask=torch.ones_like(mask))
    _, loss_plain = model(x, y)
    torch.testing.assert_close(loss_all, loss_plain)


def test_z_loss_adds_z_times_logsumexp_squared():
    model = tiny_model()
    with torch.no_grad():  # make logsumexp clearly non-zero
        model.lm_head.weight.mul_(20)
    x, y = random_tokens()
    z = 1e-2
    logits, loss = model(x, y, z_loss=z)
    flat = logits.double().reshape(-1, V)
    lse = torch.log(torch.exp(flat).sum(-1))
    ce = lse - flat.gather(-1, y.reshape(-1, 1)).squeeze(-1)
    expected = (ce + z * lse ** 2).mean()
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
    _, loss_no_z = model(x, y)
    assert loss.item() - loss_no_z.item() > 1e-4  # the term is actually there
    # with a mask, the z term is averaged over the same positions as the cross entropy
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, ::3] = True
    _, loss_m = model(x, y, loss_mask=mask, z_loss=z)
    expected_m = (ce + z * lse ** 2)[mask.reshape(-1)].mean()
    assert abs(loss_m.item() - expected_m.item()) < 1e-5 * max(1.0, abs(expected_m.item()))


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
@pytest.mark.parametrize('case', ['plain', 'mask', 'z_loss', 'empty mask'])
def test_loss_only_matches_the_full_logits_path(case, dtype):
    """The training step's loss_only path (HeadCrossEntropy, in slices of rows) gives the loss and gradients of
    lm_head + cross_entropy; with a vocabulary of 4096 the slices are 128 rows, so the 3 x 100 tokens take three."""
    model = tiny_model(vocab_size=4096, block_size=100)
    randomize_norm_gains(model)
    x, y = random_tokens(B=3, T_=100, vocab=4096)
    mask = {'mask': torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.4,
            'empty mask': torch.zeros(x.shape, dtype=torch.bool)}.get(case)
    kwargs = dict(loss_mask=mask, z_loss=1e-2 if case == 'z_loss' else 0.0)
    results = []
    for loss_only in (False, True):
        model.zero_grad()
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, loss = model(x, y, loss_only=loss_only, **kwargs)
        (3 * loss).backward()  # a scaled loss, as gradient accumulation divides it
        assert (logits is None) == loss_only
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (loss_sliced, grads_sliced) = results
    tol = 1e-5 if dtype is None else 2e-2  # bf16 matmuls round the slices' partial sums differently
    torch.testing.assert_close(loss_sliced, loss, rtol=1e-6, atol=1e-6)
    for g, g_sliced in zip(grads, grads_sliced):
        torch.testing.assert_close(g_sliced, g, rtol=tol, atol=tol * g.abs().max().item())
    assert (loss_sliced == 0) == (grads_sliced[-1].abs().sum() == 0) == (case == 'empty mask')  # lm_head's gradient


def test_loss_only_skips_what_is_not_needed():
    model = tiny_model()
    x, y = random_tokens()
    model.lm_head.weight.requires_grad_(False)  # a frozen head (LoRA): no gradient computed for it
    _, loss = model(x, y, loss_only=True)
    loss.backward()
    assert model.lm_head.weight.grad is None and model.wte.weight.grad is not None
    with torch.no_grad():  # no gradient wanted: the plain path, logits included
        logits, loss_eval = model(x, y, loss_only=True)
    assert logits is not None and torch.equal(loss_eval, model(x, y)[1].detach())


def test_causality():
    model = tiny_model()
    randomize_norm_gains(model)
    x, _ = random_tokens(B=2)
    with torch.no_grad():
        base = model(x)[0]
        for t in (0, 5, T - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 17) % V
            changed = model(x2)[0]
            torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert (changed[:, t:] - base[:, t:]).abs().amax(-1).min() > 1e-4  # t and later do see it


def test_causality_gradient():
    """No gradient flows from the logits at position s to embeddings at positions > s."""
    model = tiny_model()
    x, _ = random_tokens(B=1)
    emb = model.wte(x).detach().requires_grad_(True)
    h = emb
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for block in model.blocks:
        h = block(h, cos, sin)
    s = 6
    h[0, s].sum().backward()
    assert emb.grad[0, s + 1:].abs().max() == 0
    assert emb.grad[0, :s + 1].abs().amax(-1).min() > 0


# ---------------------------------------------------------------- RoPE

def test_rope_scores_depend_only_on_relative_position():
    hd, n = 16, 24
    cos, sin = rope_cache(n, hd, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    # the same q and k at every position: rotated, the scores must be a Toeplitz matrix
    qr = apply_rope(q.expand(1, 1, n, hd), cos, sin)[0, 0]
    kr = apply_rope(k.expand(1, 1, n, hd), cos, sin)[0, 0]
    scores = qr @ kr.T
    for m, nn_, shift in [(0, 0, 7), (3, 1, 10), (2, 9, 5), (20, 0, 3)]:
        assert abs(scores[m, nn_] - scores[m + shift, nn_ + shift]) < 1e-4
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], rtol=0, atol=1e-4)
    # ... and do depend on the relative position
    assert (scores[0, 0] - scores[5, 0]).abs() > 1e-3
    # rotations preserve norms, and position 0 is the identity
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qr[0], q)


def test_rope_is_a_rotation_of_half_split_pairs():
    """Pair i is (x[i], x[i + hd/2]) rotated by the angle pos * theta^(-2i/hd) (the OLMo / HF layout)."""
    hd, theta, pos = 8, 10000.0, 5
    cos, sin = rope_cache(pos + 1, hd, theta)
    x = torch.randn(hd, generator=torch.Generator().manual_seed(3))
    out = apply_rope(x.view(1, 1, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).view(hd)
    for i in range(hd // 2):
        angle = pos * theta ** (-2 * i / hd)
        a, b = x[i].item(), x[i + hd // 2].item()
        assert abs(out[i].item() - (a * math.cos(angle) - b * math.sin(angle))) < 1e-5
        assert abs(out[i + hd // 2].item() - (a * math.sin(angle) + b * math.cos(angle))) < 1e-5


def test_model_uses_rope_theta():
    m1 = tiny_model(rope_theta=10000.0)
    m2 = tiny_model(rope_theta=500000.0)
    cos_expected, _ = rope_cache(T, D // H, 500000.0)
    torch.testing.assert_close(m2.rope_cos, cos_expected)
    x, _ = random_tokens()
    with torch.no_grad():
        assert not torch.allclose(m1(x)[0], m2(x)[0])


# ---------------------------------------------------------------- init and counts

def test_init_truncated_normal():
    model = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
    n_checked = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight.detach()
            assert w.abs().max() <= 0.06 + 1e-7
            assert abs(w.mean().item()) < 0.002
            assert abs(w.std().item() - 0.02) < 0.0015, (module, w.std().item())
            n_checked += 1
        if isinstance(module, RMSNorm):
            assert torch.equal(module.weight.detach(), torch.ones_like(module.weight))
    assert n_checked == 2 + 2 * 7
    all_w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))])
    # a 3-sigma truncated normal(0, 0.02) has std 0.02 * 0.9866 and a visible tail beyond 2 sigma
    assert abs(all_w.std().item() - 0.02 * 0.9866) < 0.0003
    assert 0.02 < (all_w.abs() > 0.04).float().mean().item() < 0.07


def test_num_params():
    for kw in ({}, dict(n_kv_head=2, qk_norm=True), dict(intermediate_size=40)):
        model = tiny_model(**kw)
        cfg = model.config
        total, non_emb = model.num_params()
        assert total == sum(p.numel() for p in model.parameters())
        assert non_emb == total - 2 * V * D
        # independent count from the architecture
        kv = (cfg.n_kv_head or H) * (D // H)
        hidden = cfg.intermediate_size or 4 * D
        per_layer = D * D * 2 + 2 * D * kv + 3 * D * hidden + 2 * D
        if cfg.qk_norm:
            per_layer += D + kv
        assert total == 2 * V * D + L * per_layer + D
    # untied: input embedding and head are different tensors with different storage
    assert model.wte.weight is not model.lm_head.weight
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()
    with torch.no_grad():
        model.wte.weight.zero_()
    assert model.lm_head.weight.abs().sum() > 0


# ---------------------------------------------------------------- OLMo-2 switches

def manual_attention(attn, x, cos, sin, n_head, n_kv_head, qk_norm, eps):
    B, T_, C = x.shape
    hd = C // n_head
    q, k, v = x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T
    if qk_norm:
        q = manual_rmsnorm(q, attn.q_norm.weight, eps)
        k = manual_rmsnorm(k, attn.k_norm.weight, eps)
    q = q.view(B, T_, n_head, hd).transpose(1, 2)
    k = k.view(B, T_, n_kv_head, hd).transpose(1, 2)
    v = v.view(B, T_, n_kv_head, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = n_head // n_kv_head
    kv_index = torch.tensor([h // group for h in range(n_head)])  # query head h reads kv head h // group
    k, v = k[:, kv_index], v[:, kv_index]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(T_, T_, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float('-inf'))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T_, C) @ attn.o_proj.weight.T


@pytest.mark.parametrize('n_kv_head,qk_norm', [(0, False), (0, True), (2, False), (2, True), (1, True)])
def test_attention_matches_manual(n_kv_head, qk_norm):
    cfg = tiny_config(n_kv_head=n_kv_head, qk_norm=qk_norm)
    torch.manual_seed(0)
    attn = Attention(cfg)
    kv = (n_kv_head or H) * (D // H)
    assert attn.k_proj.weight.shape == (kv, D) and attn.v_proj.weight.shape == (kv, D)
    if qk_norm:
        assert attn.q_norm.weight.shape == (D,)  # over the full projection widths, not per head
        assert attn.k_norm.weight.shape == (kv,)
        randomize_norm_gains(attn)
    else:
        assert attn.q_norm is None and attn.k_norm is None
    cos, sin = rope_cache(T, D // H, cfg.rope_theta)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    out = attn(x, cos, sin)
    expected = manual_attention(attn, x, cos, sin, H, n_kv_head or H, qk_norm, cfg.norm_eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_normalises_over_full_width():
    """Scaling one head's part of the query projection changes the other heads' normalised queries."""
    cfg = tiny_config(qk_norm=True)
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(1, T, D)
    q = attn.q_norm(attn.q_proj(x))
    rms = q.pow(2).mean(-1)
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    hd, n_kv = D // H, 2
    group = H // n_kv
    torch.manual_seed(0)
    gqa = Attention(tiny_config(n_kv_head=n_kv))
    mha = Attention(tiny_config())
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ('k_proj', 'v_proj'):
            w = getattr(gqa, name).weight.view(n_kv, hd, D).repeat_interleave(group, dim=0).reshape(H * hd, D)
            getattr(mha, name).weight.copy_(w)
    cos, sin = rope_cache(T, hd, 10000.0)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-5)
    # the full model runs forward and backward with GQA
    model = tiny_model(n_kv_head=n_kv)
    xs, ys = random_tokens()
    _, loss = model(xs, ys)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('norm_position', ['pre', 'post'])
def test_block_norm_position(norm_position):
    cfg = tiny_config(norm_position=norm_position)
    torch.manual_seed(0)
    block = Block(cfg)
    randomize_norm_gains(block)
    cos, sin = rope_cache(T, D // H, cfg.rope_theta)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    eps = cfg.norm_eps

    def attn(h):
        return manual_attention(block.attn, h, cos, sin, H, H, False, eps)

    def mlp(h):
        m = block.mlp
        return (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T

    def attn_norm(h):
        return manual_rmsnorm(h, block.attn_norm.weight, eps)

    def mlp_norm(h):
        return manual_rmsnorm(h, block.mlp_norm.weight, eps)

    if norm_position == 'pre':
        h = x + attn(attn_norm(x))
        expected = h + mlp(mlp_norm(h))
    else:  # OLMo-2 "reordered" norm: the norm is applied to the sublayer output
        h = x + attn_norm(attn(x))
        expected = h + mlp_norm(mlp(h))
    torch.testing.assert_close(block(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
    # the other ordering with the same weights gives something else
    other = Block(tiny_config(norm_position='post' if norm_position == 'pre' else 'pre'))
    other.load_state_dict(block.state_dict())
    assert not torch.allclose(other(x, cos, sin), expected, atol=1e-3)


def test_olmo2_model_runs():
    model = tiny_model(qk_norm=True, norm_position='post', rope_theta=500000.0, n_kv_head=2)
    x, y = random_tokens()
    _, loss = model(x, y, z_loss=1e-5)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.blocks[0].attn.q_norm.weight.grad.abs().sum() > 0
    with pytest.raises(AssertionError):
        GPT(tiny_config(norm_position='middle'))


# ---------------------------------------------------------------- param groups

@pytest.mark.parametrize('qk_norm', [False, True])
def test_param_groups(qk_norm):
    model = tiny_model(qk_norm=qk_norm)
    name_of = {id(p): n for n, p in model.named_parameters()}
    for decay_embeddings in (True, False):
        groups = model.param_groups(0.1, decay_embeddings=decay_embeddings)
        ids = [id(p) for g in groups for p in g['params']]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each parameter exactly once
        assert set(ids) == set(name_of)
        decayed = {name_of[id(p)] for g in groups if g['weight_decay'] > 0 for p in g['params']}
        not_decayed = {name_of[id(p)] for g in groups if g['weight_decay'] == 0 for p in g['params']}
        assert all(g['weight_decay'] in (0.0, 0.1) for g in groups)
        for n, p in model.named_parameters():
            if isinstance(model.get_submodule(n.rsplit('.', 1)[0]), RMSNorm):
                assert n in not_decayed, n
            elif n == 'wte.weight':
                assert (n in decayed) == decay_embeddings
            else:
                assert p.dim() == 2 and n in decayed, n
        assert 'lm_head.weight' in decayed
        if qk_norm:
            assert 'blocks.0.attn.q_norm.weight' in not_decayed
        torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer spec
