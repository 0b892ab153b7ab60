"""
Sharpness-Aware Minimization (Foret et al. 2021) around any torch optimizer.

    sam = SAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)
    loss_fn().backward()          # gradient g at w (raw: do not clip it)
    sam.first_step()              # w <- w + rho * g / ||g||
    sam.zero_grad()
    loss_fn().backward()          # gradient at the perturbed point
    clip_grad_norm_(...)          # optional: only the descent gradient is clipped
    sam.second_step()             # back to w, then the base optimizer steps

Or in one call: sam.step(closure) with a closure that zeroes grads, computes the loss and backprops.

Momentum-SAM (Becker et al. 2024) takes no ascent gradient: sam.first_step_along_momentum() moves to
w - rho m / ||m|| along AdamW's first moment m (exp_avg; the authors' sign: one normalised step further along the update
direction), then one backward, clip, sam.second_step(). A step costs about one forward and backward.

LookSAM (Liu et al. 2022), SAM(..., looksam=True): restore() keeps g_v, the component of the gradient at w + e that is
orthogonal to the ascent direction (a second parameter-sized buffer); between SAM steps,
sam.add_kept_component(alpha) adds alpha ||g|| / ||g_v|| g_v to the plain gradient g.

Under DDP run the first backward inside `with sam.ascent_context(model):`, which
is model.no_sync(): each rank perturbs along its own local gradient (the paper's
m-sharpness) and the second backward all-reduces as usual. SAM(..., sync_ascent=True)
all-reduces the ascent gradient too. SAM keeps one parameter-sized buffer (a copy of w,
allocated once) and its state_dict is the base optimizer's, so a run can switch
between AdamW and SAM through a checkpoint.
"""
import contextlib

import torch


class SAM:
    def __init__(self, base_optimizer, rho=0.05, adaptive=False, sync_ascent=False, looksam=False):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive  # ASAM (Kwon et al. 2021): perturbation scaled elementwise by w^2
        self.sync_ascent = sync_ascent  # DDP: all-reduce the ascent gradient too (not the paper's default)
        self.saved_weights = None  # the one extra parameter-sized buffer: w while we sit at w + e
        self.perturbed_params = None
        if looksam and adaptive:
            raise ValueError("LookSAM needs the ascent along the gradient itself (adaptive=False)")
        self.looksam = looksam
        self.kept_component = None  # LookSAM's g_v, {param: tensor}; None until the first SAM step

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def ascent_context(self, model):
        """Wrap the first (ascent) backward in this: under DDP it keeps the gradient local to each rank."""
        if hasattr(model, 'no_sync') and not self.sync_ascent:
            return model.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def first_step(self):
        """Move to w + e(w) along the raw gradient and return its norm (a 0-dim tensor). A non-finite norm moves by
        zero instead: decided on the device, so the step never waits for the host to read the norm."""
        params = [p for group in self.param_groups for p in group['params'] if p.grad is not None]
        grads = [p.grad for p in params]  # discarded after this step: scaled in place below
        if self.adaptive:  # ASAM: e = rho T^2 g / ||T g|| with T = |w| elementwise; grads become T g here
            abs_w = torch._foreach_abs(params)
            torch._foreach_mul_(grads, abs_w)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.saved_weights is None:
            self.saved_weights = {p: torch.empty_like(p) for group in self.param_groups for p in group['params']}
        self.perturbed_params = params
        torch._foreach_copy_([self.saved_weights[p] for p in params], params)
        if self.adaptive:  # ... and T^2 g here
            torch._foreach_mul_(grads, abs_w)
        finite = torch.isfinite(norm)
        for g in grads:  # a non-finite gradient times a zero step would still be NaN
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        step = torch.where(finite, self.rho / (norm.double() + 1e-12), 0.0).to(norm.dtype)
        # addcmul with a 0-dim step rounds exactly as add_(g, alpha=step) does (one fused multiply-add)
        torch._foreach_addcmul_(params, grads, [step.expand_as(g) for g in grads])
        return norm

    @torch.no_grad()
    def first_step_along_momentum(self):
        """Momentum-SAM: move to w - rho m / ||m||, m = the base optimizer's exp_avg (the same on every DDP rank, as
        it comes from all-reduced gradients). Before the first step there is no m yet: no move. Returns ||m||."""
        state = self.base_optimizer.state
        params = [p for group in self.param_groups for p in group['params'] if 'exp_avg' in state.get(p, {})]
        if not params:
            return 0.0
        moments = [state[p]['exp_avg'] for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(moments)))
        if self.saved_weights is None:
            self.saved_weights = {p: torch.empty_like(p) for group in self.param_groups for p in group['params']}
        self.perturbed_params = params
        torch._foreach_copy_([self.saved_weights[p] for p in params], params)
        scale = -self.rho / (norm + 1e-12)  # a tensor: no host sync
        torch._foreach_addcmul_(params, moments, [scale] * len(params))
        return norm

    @torch.no_grad()
    def keep_orthogonal_component(self):
        """LookSAM: g_v = g_s - <g_s, u> u, g_s the gradient here at w + e, u = e / ||e|| (the ascent direction).
        Under DDP with a rank-local ascent, u differs between ranks: g_v is averaged, so every rank keeps the same."""
        params = self.perturbed_params
        if self.kept_component is None:
            self.kept_component = {p: torch.zeros_like(p) for group in self.param_groups for p in group['params']}
        kept = [self.kept_component[p] for p in params]
        torch._foreach_copy_(kept, params)
        torch._foreach_sub_(kept, [self.saved_weights[p] for p in params])  # e
        torch._foreach_div_(kept, torch.linalg.vector_norm(torch.stack(torch._foreach_norm(kept))) + 1e-12)  # u
        grads = [p.grad for p in params]
        along = sum((g * u).sum() for g, u in zip(grads, kept))  # <g_s, u>
        torch._foreach_mul_(kept, -along)
        torch._foreach_add_(kept, grads)
        if not self.sync_ascent and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            for tensor in kept:
                torch.distributed.all_reduce(tensor)
            torch._foreach_div_(kept, torch.distributed.get_world_size())

    @torch.no_grad()
    def add_kept_component(self, alpha):
        """LookSAM between SAM steps: g <- g + alpha ||g|| / ||g_v|| g_v (nothing before the first SAM step)."""
        if self.kept_component is None:
            return
        params = [p for group in self.param_groups for p in group['params'] if p.grad is not None]
        grads, kept = [p.grad for p in params], [self.kept_component[p] for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        kept_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(kept)))
        torch._foreach_addcmul_(grads, kept, [alpha * grad_norm / (kept_norm + 1e-12)] * len(params))

    @torch.no_grad()
    def restore(self):
        """Back to exactly w: copied, not subtracted, so no rounding error accumulates. (LookSAM: first keep g_v.)"""
        if self.perturbed_params is not None and self.looksam:
            self.keep_orthogonal_component()
        if self.perturbed_params is not None:
            torch._foreach_copy_(self.perturbed_params, [self.saved_weights[p] for p in self.perturbed_params])
            self.perturbed_params = None

    def second_step(self):
        self.restore()
        self.base_optimizer.step()

    def step(self, closure):
        """A whole SAM step; closure() must zero the grads, compute the loss, backprop and return the loss."""
        loss = closure()
        self.first_step()
        closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
