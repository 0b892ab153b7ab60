"""
Sharpness of a model's loss at its weights, four ways (evaluate.py reports them; an experiment runner imports them).

Every function takes the model (float32, put in eval mode here) and a fixed list of batches [(x, y, loss_mask or
None), ...]; the loss L is the mean of the model's per-batch losses (for equal-size unmasked batches: the mean over
tokens). Each returns (result dict, cost dict), the cost counting seconds and model passes: a "forward pass" or
"backward pass" is one batch; one HVP is a Hessian-vector product of the whole L, i.e. len(batches) double-backward
passes (about 3-4 forward passes each). No autocast: curvature needs float32.

  noise_proxy          the paper's proxy: L after adding Gaussian noise to every parameter tensor
  top_hessian_eigenvalue  Lanczos on HVPs: the largest (and smallest) eigenvalue of the Hessian of L
  hessian_trace        Hutchinson's estimator with Rademacher probes
  sam_sharpness        L(w + rho g/||g||) - L(w), the exact perturbation sam.SAM applies in training
"""
import math
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sam import SAM


def batches_loss(model, batches):
    return sum(model(x, y, loss_mask=mask)[1] for x, y, mask in batches) / len(batches)


def _params(model):
    model.eval()
    return [p.requires_grad_(True) for p in model.parameters()]


@torch.no_grad()
def noise_proxy(model, batches, sigmas, seeds=3, scaling='absolute', seed=0):
    """Mean (over seeds) of L(w + noise) for each sigma; loss_increase = that - L(w).

    scaling='absolute' (our default): std = sigma for every tensor (a norm gain near 1 then barely moves while a
    0.02-scale projection is swamped). scaling='relative': the noise on a tensor W has std sigma * rms(W),
    rms(W) = sqrt(mean(W^2)), so every tensor is moved by the same fraction of its typical size. The authors scale
    per tensor but their rule is ambiguous, hence both; absolute is the default because the paper's sigma grid
    (0.009..0.1) only spans a useful range of loss increases that way (see evaluate.py's docstring).
    Noise seed s (of `seeds`) draws one standard-normal direction z_s, reused for every sigma (common random numbers:
    the curve over sigma is smooth and sigma=0 is exactly the clean loss)."""
    if scaling not in ('relative', 'absolute'):
        raise ValueError(f"scaling must be 'relative' or 'absolute', got {scaling!r}")
    params, start = _params(model), time.time()
    saved = [p.detach().clone() for p in params]
    scales = [p.pow(2).mean().sqrt().item() if scaling == 'relative' else 1.0 for p in params]
    clean = batches_loss(model, batches).item()
    losses = [[] for _ in sigmas]
    for s in range(seeds):
        for i, sigma in enumerate(sigmas):
            gen = torch.Generator(device=params[0].device).manual_seed(seed + s)
            for p, w, scale in zip(params, saved, scales):
                p.copy_(w + sigma * scale * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
            losses[i].append(batches_loss(model, batches).item())
    for p, w in zip(params, saved):
        p.copy_(w)
    mean = [sum(row) / len(row) for row in losses]
    std = [math.sqrt(sum((v - m) ** 2 for v in row) / max(1, len(row) - 1)) for row, m in zip(losses, mean)]
    result = {'sigmas': list(sigmas), 'loss': mean, 'loss_std': std, 'loss_increase': [m - clean for m in mean],
              'clean_loss': clean, 'scaling': scaling, 'seeds': seeds}
    return result, {'seconds': time.time() - start, 'forward_passes': (1 + seeds * len(sigmas)) * len(batches)}


def hvp(model, batches, vector):
    """H v for the flat vector v (parameter order of model.parameters()), by double backward.

    SDPA's fused CPU (and CUDA flash) kernels have no double backward, so attention runs on its math path here."""
    params = _params(model)
    pieces = [t.view_as(p) for t, p in zip(torch.split(vector, [p.numel() for p in params]), params)]
    out = torch.zeros_like(vector)
    with sdpa_kernel(SDPBackend.MATH):
        for x, y, mask in batches:
            loss = model(x, y, loss_mask=mask)[1] / len(batches)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, pieces))
            out += torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])
    return out


def top_hessian_eigenvalue(model, batches, iters=20, tol=1e-3, seed=0):
    """Largest eigenvalue of the Hessian of L by Lanczos with full reorthogonalization (one HVP per iteration).

    Unlike power iteration it finds the algebraically largest eigenvalue even where a negative one is larger in
    magnitude, and converges in far fewer HVPs. Stops once the top Ritz pair (theta, y) has a residual
    ||H y - theta y|| <= tol * |theta| - then an eigenvalue of H lies within that residual of theta (for a
    symmetric H) - or after iters HVPs. Memory: iters parameter-sized vectors. min_eigenvalue (the smallest Ritz
    value) comes free but converges more slowly; read it with care."""
    params, start = _params(model), time.time()
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen).to(device=params[0].device, dtype=params[0].dtype)
    basis, alphas, betas = [q / q.norm()], [], []
    converged = False
    for _ in range(min(iters, n)):
        w = hvp(model, batches, basis[-1])
        alphas.append(torch.dot(w, basis[-1]).item())
        for _ in range(2):  # twice is enough (Kahan): float32 Lanczos loses orthogonality fast without it
            for b in basis:
                w -= torch.dot(w, b) * b
        off = torch.tensor(betas, dtype=torch.float64)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(T)
        top, beta = ritz[-1].item(), w.norm().item()
        residual = beta * abs(vectors[-1, -1].item())  # ||H y - theta y|| for the top Ritz pair, free from T
        if residual <= tol * abs(top) or beta <= 1e-8 * max(abs(top), 1e-30):  # converged or space exhausted
            converged = True
            break
        betas.append(beta)
        basis.append(w / beta)
    result = {'top_eigenvalue': top, 'min_eigenvalue': ritz[0].item(), 'iterations': len(alphas),
              'converged': converged, 'residual': residual}
    return result, {'seconds': time.time() - start, 'hvps': len(alphas), 'batches': len(batches)}


def rademacher_probes(n, samples, seed):
    """The probes hutchinson_trace uses: samples vectors of +-1, from a CPU generator seeded with seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        yield torch.randint(0, 2, (n,), generator=gen).mul_(2).sub_(1)


def hessian_trace(model, batches, samples=10, seed=0):
    """Hutchinson: tr(H) = E[v^T H v] over Rademacher v; mean of samples probes, with its standard error."""
    params, start = _params(model), time.time()
    n = sum(p.numel() for p in params)
    values = []
    for v in rademacher_probes(n, samples, seed):
        v = v.to(device=params[0].device, dtype=params[0].dtype)
        values.append(torch.dot(v, hvp(model, batches, v)).item())
    mean = sum(values) / len(values)
    variance = sum((x - mean) ** 2 for x in values) / (len(values) - 1) if len(values) > 1 else None
    stderr = math.sqrt(variance / len(values)) if variance is not None else None
    result = {'trace': mean, 'stderr': stderr, 'samples': samples, 'per_parameter': mean / n}
    return result, {'seconds': time.time() - start, 'hvps': samples, 'batches': len(batches)}


def sam_sharpness(model, batches, rho=0.05):
    """L(w + rho g/||g||) - L(w), g = grad L(w): the move sam.SAM makes in training (restored bit-exactly after)."""
    params, start = _params(model), time.time()
    sam = SAM(torch.optim.SGD(params, lr=0.0), rho=rho)  # SGD is never stepped: SAM only needs its param groups
    sam.zero_grad()
    loss = 0.0
    for x, y, mask in batches:  # one batch's graph at a time
        batch_loss = model(x, y, loss_mask=mask)[1] / len(batches)
        batch_loss.backward()
        loss += batch_loss.item()
    grad_norm = sam.first_step().item()
    with torch.no_grad():
        perturbed = batches_loss(model, batches).item()
    sam.restore()
    sam.zero_grad()
    result = {'sharpness': perturbed - loss, 'loss': loss, 'perturbed_loss': perturbed,
              'grad_norm': grad_norm, 'rho': rho}
    return result, {'seconds': time.time() - start, 'forward_passes': 2 * len(batches), 'backward_passes': len(batches)}
