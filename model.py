"""
The paper's decoder-only transformer, OLMo style, in one file.

OLMo v1 (the paper's 20M-150M models): pre-norm RMSNorm (eps 1e-6), SwiGLU MLP
with hidden size 4*d, rotary position embeddings, no biases, untied input and
output embeddings, weights ~ normal(0, 0.02) truncated at 3 sigma.

OLMo-2 (to load OLMo-2-1B): the same blocks with qk_norm=True (RMSNorm over the
full query and key projections) and norm_position='post' ("reordered" norm:
x = x + norm(attn(x)) instead of x = x + attn(norm(x))), rope_theta=500000.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 100352  # dolma2 tokenizer's 100,278 padded to a multiple of 128
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    n_kv_head: int = 0  # 0 = n_head; fewer gives grouped-query attention
    intermediate_size: int = 0  # SwiGLU hidden size; 0 = 4 * n_embd
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    norm_position: str = 'pre'  # 'pre' (OLMo v1) or 'post' (OLMo-2's reordered norm)
    init_std: float = 0.02


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 even under bf16 autocast, as OLMo does
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x_fp32).to(x.dtype)


def rope_cache(block_size, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # non-interleaved halves, as in OLMo and Hugging Face
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i weights_i * (cross-entropy of h_i @ weight^T at targets_i [+ z_loss * logsumexp^2]): GPT.forward's loss
    and its gradient, taken a few hundred rows at a time, so that each slice of logits stays in the CPU's cache instead
    of a (tokens x vocab) tensor going through memory five times. The gradient is computed in the forward pass (the
    loss is the graph's end), so backward only scales it. Same math as lm_head + cross_entropy; float rounding differs
    (docs/speed.md). First-order only: GPT.forward uses it when the caller asks for loss_only."""

    @staticmethod
    def forward(ctx, h, weight, targets, weights, z_loss):
        rows = max(32, 2 ** 19 // weight.size(0))  # 2 MiB of float32 logits per slice
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, h.size(0), rows):
            h_i, targets_i, weights_i = h[i:i + rows], targets[i:i + rows, None], weights[i:i + rows, None]
            logits = (h_i @ weight.t()).float()  # under autocast the matmul runs in its dtype, as lm_head's would
            target_logits = logits.gather(1, targets_i)
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=-1, keepdim=True)
            logsumexp = row_max + sum_exp.log()
            per_token = logsumexp - target_logits
            scale = weights_i / sum_exp  # each token's softmax, times its weight in the mean
            if z_loss:
                per_token = per_token + z_loss * logsumexp.pow(2)
                scale = scale * (1 + 2 * z_loss * logsumexp)
            loss = loss + (per_token * weights_i).sum()
            grad_logits = exp.mul_(scale).scatter_add_(1, targets_i, -weights_i).to(h.dtype)  # (softmax - one_hot) * w
            grad_h[i:i + rows] = grad_logits @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h_i).float()
        ctx.save_for_backward(grad_h, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_loss * grad_h, None if grad_weight is None else grad_loss * grad_weight, None, None, None


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        assert self.n_head % self.n_kv_head == 0, "n_head must be divisible by n_kv_head"
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.n_embd, config.norm_eps)
            self.k_norm = RMSNorm(kv_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.intermediate_size or 4 * config.n_embd
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.post_norm = config.norm_position == 'post'
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin):
        if self.post_norm:
            x = x + self.attn_norm(self.attn(x, cos, sin))
            return x + self.mlp_norm(self.mlp(x))
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.norm_position in ('pre', 'post'), f"norm_position must be 'pre' or 'post', got {config.norm_position!r}"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.config.init_std
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def num_params(self):
        """Total and non-embedding parameter counts (non-embedding excludes the input embedding and output head)."""
        total = sum(p.numel() for p in self.parameters())
        return total, total - self.wte.weight.numel() - self.lm_head.weight.numel()

    def flops_per_token(self):
        """Training FLOPs per token of one forward/backward pass: 6 x (non-embedding + output-head parameters) plus
        attention's 6 x layers x context x width (Kaplan et al. 2020: each token attends to half the context on average
        under the causal mask; QK^T and AV, 2 FLOPs per multiply-add, 3 for forward and backward)."""
        _, non_embedding = self.num_params()
        c = self.config
        return 6 * (non_embedding + self.lm_head.weight.numel()) + 6 * c.n_layer * c.block_size * c.n_embd

    def forward(self, idx, targets=None, loss_mask=None, z_loss=0.0, loss_only=False):
        """Logits, and the mean next-token loss over positions where loss_mask is true (all if None).

        With z_loss > 0 the returned loss adds z_loss * logsumexp(logits)^2 (OLMo-2's auxiliary loss).
        loss_only=True (the training step) returns (None, loss), on a CPU through HeadCrossEntropy: faster, but its
        gradient is first-order only (a Hessian-vector product through it would be silently wrong)."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        x = self.wte(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm_f(x)
        if (loss_only and targets is not None and torch.is_grad_enabled() and x.device.type == 'cpu'
                and type(self.lm_head) is nn.Linear):
            weights = torch.ones_like(targets, dtype=torch.float32) if loss_mask is None else loss_mask.float()
            weights = (weights / weights.sum().clamp(min=1)).reshape(-1)
            loss = HeadCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                          weights, z_loss)
            return None, loss
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        logits_fp32 = logits.float().view(-1, logits.size(-1))
        per_token = F.cross_entropy(logits_fp32, targets.reshape(-1), reduction='none')
        if z_loss:
            per_token = per_token + z_loss * torch.logsumexp(logits_fp32, dim=-1).pow(2)
        if loss_mask is None:
            return logits, per_token.mean()
        mask = loss_mask.reshape(-1).to(per_token.dtype)
        return logits, (per_token * mask).sum() / mask.sum().clamp(min=1)

    def param_groups(self, weight_decay, decay_embeddings=True):
        """AdamW groups: matrices decay, norm gains never do; embeddings optionally (OLMo-2 mid-training: not)."""
        no_decay_ids = {id(self.wte.weight)} if not decay_embeddings else set()
        decay = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in no_decay_ids]
        other = [p for p in self.parameters() if p.dim() < 2 or id(p) in no_decay_ids]
        return [{'params': decay, 'weight_decay': weight_decay}, {'params': other, 'weight_decay': 0.0}]
