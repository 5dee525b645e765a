"""TRPO (Schulman et al. 2015): one natural-gradient step per rollout, inside a KL trust region.

With theta_old the parameters that sampled the rollout, A_i the sequence advantage of response i (the same
on every token; ``pg.advantage``), M the set of scored response tokens and r_t = pi(y_t) / pi_old(y_t):

    L(theta)  = 1/|M| sum_{t in M} r_t(theta) A_t  [- beta * 1/|M| sum_t k(log pi, log pi_ref)  if pg.beta > 0]
    KL(theta) = 1/|M| sum_{t in M} sum_v pi_old(v | s_t) (log pi_old(v | s_t) - log pi_theta(v | s_t))

KL is the *exact* categorical KL over the vocabulary at every response position (a sampled-token estimate
is not usable: its Hessian at theta_old is not the Fisher). The Fisher-vector products may use a subsample
(``trpo.fisher_fraction``: samples g of each group with g % k == 0, the KL then a mean over their tokens), as
the original TRPO did; L, g, and the line search's KL always use every token. The step (TRPO's Appendix C):

    g = grad L(theta_old);  F v = J^T (H (J v)) + damping * v, the Hessian of KL at theta_old (the Fisher):
        s = logits / temperature at the scored tokens, J = ds/dtheta, H = (diag(p_old) - p_old p_old^T) / |M|
        per token; J v by forward-mode differentiation, J^T u by one backward
    x = F^-1 g by ``cg_iters`` of conjugate gradient;  full step s = sqrt(2 * max_kl / (x^T F x)) * x, with
        F x = g - r from conjugate gradient's own residual r (no extra product)
    theta = theta_old + ratio^k * s for k = 0 .. backtrack_steps - 1: the first with KL <= max_kl and
        L(theta) > L(theta_old) is kept; if none is, theta_old is restored bit for bit.

pi_old is recomputed at theta_old in the same forward that gives g (one update per rollout, so it is the
sampler's policy; recomputing keeps r = 1 exactly at theta_old instead of carrying the sampler's float
noise). One forward per micro-batch gives the full distribution (for KL) and the sampled tokens' log-probs
(for L), so :func:`rlmt.train.update.response_logprobs` (sampled tokens only) is not used. The optimizer
and scheduler are *not* used: TRPO computes its own step, and the reported ``lr`` is 0.

Cost and memory: the trainable parameters (all of them, or only the LoRA adapters of a peft model) are
handled as flat float32 vectors (about 6 copies of their size). Each conjugate-gradient iteration is a
forward-mode (dual) pass and a forward and backward per micro-batch (``optim.batch_size`` sequences) of the
Fisher's sequences. The full-vocabulary
log-probs of pi_old at every scored response token are kept for the whole update: |M| x V x 4 bytes (32 x 64
tokens x 49152 vocab ~ 400 MB), plus a micro-batch's logits and their graph during each pass. The update
runs in eval mode (no dropout), so L and KL are deterministic functions of theta. The forward-mode passes
run attention on the math SDPA backend (the one with forward-mode formulas); a model loaded with
``attn_implementation="flash_attention_2"`` is not supported.

On several ranks (``ctx.world``) each rank holds its prompt groups' tokens; |M|, L, KL, g and every F v are
sums over all ranks' tokens (one all-reduce each), so every rank runs the same conjugate gradient on the same
numbers and makes the same line-search decision: the ranks take the same step without sending it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlmt.rollout.logprobs import position_ids_from_mask
from rlmt.objectives import approx_kl, kl_penalty_loss, masked_sum
from rlmt.train.experience import Advantages, Experience, UpdateContext
from rlmt.train.metrics import reduce_across


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def flat_params(params: list[torch.nn.Parameter]) -> Tensor:
    """The parameters as one detached vector (a copy), float32 (float64 if the parameters are)."""
    return torch.cat([_at_least_fp32(p.detach().reshape(-1)) for p in params])


def set_flat_params(params: list[torch.nn.Parameter], vec: Tensor) -> None:
    """Copy ``vec`` into the parameters in place (storage, dtype and identity of each parameter are kept)."""
    with torch.no_grad():
        for p, chunk in zip(params, vec.split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


def _flat_grad(out: Tensor, params: list[torch.nn.Parameter], grad_outputs: Tensor | None = None) -> Tensor:
    """d out / d params (``grad_outputs``: the vector-Jacobian product u^T d out / d params), flat."""
    grads = torch.autograd.grad(out, params, grad_outputs=grad_outputs, allow_unused=True)
    return torch.cat([_at_least_fp32((torch.zeros_like(p) if g is None else g).reshape(-1))
                      for g, p in zip(grads, params)])


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-10,
                       ) -> tuple[Tensor, float, Tensor]:
    """Approximately solve F x = b for symmetric positive-definite F given only v -> F v.

    Returns (x, |r|, F x = b - r) after at most ``iters`` iterations (fewer once |r|^2 < tol, or at a
    direction of non-positive curvature), r = b - F x the residual the iteration carries. A non-finite F v
    returns a NaN x, which the caller treats as a skipped step.
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = float(r @ r)
    for _ in range(iters):
        if rr < tol:
            break
        fp = fvp(p)
        pfp = float(p @ fp)
        if not math.isfinite(pfp):
            nan = torch.full_like(b, float("nan"))
            return nan, float("nan"), nan
        if pfp <= 0:
            break
        alpha = rr / pfp
        x += alpha * p
        r -= alpha * fp
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, math.sqrt(rr), b - r


def line_search(evaluate: Callable[[Tensor], dict[str, float]], theta_old: Tensor, full_step: Tensor,
                surrogate_old: float, max_kl: float, steps: int, ratio: float,
                ) -> tuple[float, dict[str, float]] | None:
    """Backtracking: theta_old + ratio^k * full_step for k = 0 .. steps - 1.

    ``evaluate(theta)`` loads theta into the model and returns at least ``kl`` and ``surrogate``. Returns
    (ratio^k, that evaluation) for the first theta with kl <= max_kl and a surrogate gain > 0, leaving the
    model there; None if no theta qualifies (the caller restores theta_old).
    """
    for k in range(steps):
        frac = ratio ** k
        ev = evaluate(theta_old + frac * full_step)
        ok = math.isfinite(ev["kl"]) and math.isfinite(ev["surrogate"])
        if ok and ev["kl"] <= max_kl and ev["surrogate"] - surrogate_old > 0:
            return frac, ev
    return None


class _ScoresOf(torch.nn.Module):
    """A problem's scores (:meth:`TrustRegionProblem._scores`) as a module over the policy's parameters (named
    ``policy.*``), for ``torch.func``."""

    def __init__(self, problem: "TrustRegionProblem"):
        super().__init__()
        self.policy, self.problem = problem.policy, problem

    def forward(self, rows: Tensor) -> Tensor:
        return self.problem._scores(rows)


class TrustRegionProblem:
    """L, KL, grad L and F v of one scored rollout; pi_old is recorded by :meth:`surrogate_gradient`. On
    several ranks every returned figure and vector is the sum over all ranks' tokens."""

    def __init__(self, ctx: UpdateContext, exp: Experience, adv: Tensor):
        self.policy, self.exp, self.adv, self.pg, self.world = ctx.policy, exp, adv, ctx.cfg.pg, ctx.world
        self.params = [p for p in ctx.policy.parameters() if p.requires_grad]
        self.n_tokens = self.world.sum_scalar(float(exp.mask.sum()))  # |M| over every rank
        bs = max(1, ctx.cfg.optim.batch_size)
        self.micro = [rows for rows in torch.arange(exp.mask.shape[0]).split(bs) if exp.mask[rows].any()]
        self.old: list[Tensor] = []  # per micro-batch (m, V) log pi_old at its scored response tokens
        # the Fisher's sequences: samples g % k == 0 of every group (the same ones on any number of ranks)
        k = min(max(1, round(1 / ctx.cfg.trpo.fisher_fraction)), max(1, exp.group_size))
        chosen = torch.arange(exp.mask.shape[0])
        chosen = chosen[(chosen % max(1, exp.group_size)) % k == 0]
        self.fisher_micro = [rows for rows in chosen.split(bs) if exp.mask[rows].any()]
        self.fisher_tokens = (self.n_tokens if k == 1
                              else self.world.sum_scalar(float(exp.mask[chosen].sum())))
        self.old_rows: dict[int, Tensor] = {}  # row -> (m_row, V) log pi_old at its scored tokens

    def _log_softmax(self, rows: Tensor) -> Tensor:
        """(m, V) float32 log pi(. | s_t) at the scored response positions of ``rows`` (one full forward)."""
        return torch.log_softmax(self._scores(rows), -1)

    def _scores(self, rows: Tensor) -> Tensor:
        """(m, V) float32 logits / temperature at the scored response positions of ``rows``."""
        b, P = self.exp.batch, self.exp.batch.prompt_len
        ids, am = b.input_ids[rows], b.attention_mask[rows]
        hidden = self.policy.get_decoder()(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                                           use_cache=False).last_hidden_state  # (n, P+T, H)
        h = hidden[:, P - 1:-1][self.exp.mask[rows].bool()]  # (m, H): the states that predict response tokens
        t = self.exp.temperature if self.exp.temperature > 0 else 1.0
        return _at_least_fp32(self.policy.get_output_embeddings()(h)) / t

    def _terms(self, i: int, logp: Tensor, old: Tensor) -> dict[str, Tensor]:
        """Micro-batch i's shares (sums / |M|) of L and KL, from (m, V) log pi and log pi_old."""
        rows, m = self.micro[i], self.exp.mask[self.micro[i]].bool()  # m: (n, T)
        targets = self.exp.batch.response_ids[rows][m][:, None]  # (m, 1)
        zeros = logp.new_zeros(m.shape)
        lp = zeros.masked_scatter(m, logp.gather(-1, targets).squeeze(-1))  # (n, T) log pi(y_t)
        old_lp = zeros.masked_scatter(m, old.gather(-1, targets).squeeze(-1))
        adv = self.adv[rows][:, None].to(lp.dtype).expand_as(lp)
        out = {"surrogate": masked_sum(torch.exp(lp - old_lp) * adv, m) / self.n_tokens,
               "kl": (old.exp() * (old - logp)).sum() / self.n_tokens,
               "approx_kl": approx_kl(lp, self.exp.batch.logprobs[rows], m) * m.sum() / self.n_tokens}
        if self.exp.ref_logprobs is not None and not self.pg.kl_in_reward:
            ref_loss, _ = kl_penalty_loss(lp, self.exp.ref_logprobs[rows], m, self.pg.beta, self.pg.kl_estimator,
                                          "token_mean", self.n_tokens)
            out["surrogate"] = out["surrogate"] - ref_loss
            out["ref_kl"] = ref_loss.detach() / self.pg.beta
        return out

    def _sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the ranks (itself on one process)."""
        if self.world.size == 1:
            return x
        return self.world.all_reduce(x.to(self.world.device), "sum").to(x.device)

    def _sum_totals(self, totals: dict[str, float]) -> dict[str, float]:
        if self.world.size == 1:
            return totals
        keys = ["surrogate", "kl", "approx_kl"] + (["ref_kl"] if self.exp.ref_logprobs is not None
                                                  and not self.pg.kl_in_reward else [])
        summed = self._sum(torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist()))

    def surrogate_gradient(self) -> tuple[dict[str, float], Tensor]:
        """At theta_old: record pi_old, return (L, KL = 0, ...) and g = grad L (flat)."""
        self.old, totals = [], {}
        g = torch.zeros_like(flat_params(self.params))
        for i, rows in enumerate(self.micro):
            logp = self._log_softmax(rows)
            self.old.append(logp.detach())
            counts = self.exp.mask[rows].bool().sum(-1).tolist()  # the rows' scored tokens, in row order
            self.old_rows.update(zip(rows.tolist(), self.old[-1].split(counts)))
            terms = self._terms(i, logp, logp.detach())
            g += _flat_grad(terms["surrogate"], self.params)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
        return self._sum_totals(totals), self._sum(g)

    def fisher_vector_product(self, v: Tensor, damping: float) -> Tensor:
        """(F + damping * I) v with F the Hessian of KL(pi_old || pi_theta) at theta_old, the KL a mean over the
        Fisher's sequences' tokens (all of them unless ``trpo.fisher_fraction`` < 1).

        With s = logits / temperature at the scored tokens and J = ds/dtheta, KL's Hessian is
        J^T H J + sum_t (dKL/ds_t) d2s_t/dtheta2, and the second term is 0 at theta_old (there p_theta = p_old
        and dKL/ds = p_theta - p_old). H = (diag(p) - p p^T) / |M_F| per token, so F v = J^T (H (J v)): J v by
        forward-mode differentiation (a dual forward pass, no graph kept), then J^T u by one backward. Against
        differentiating the KL gradient again (a double backward): 1.3-1.5x faster and 7.7 -> 5.4 GB peak
        RSS on SmolLM2-135M (benchmarks/RESULTS.md, component measurements)."""
        one = self.world.size == 1
        out = damping * v if one else torch.zeros_like(v)  # (one process: the sum in its original order)
        scores = _ScoresOf(self)
        named = [(n, p) for n, p in scores.named_parameters() if p.requires_grad]
        primals = {n: p.detach() for n, p in named}
        tangents = {n: c.view_as(p).to(p.dtype) for (n, p), c in zip(named, v.split([p.numel() for _, p in named]))}
        for rows in self.fisher_micro:
            p_old = torch.cat([self.old_rows[r] for r in rows.tolist()]).exp()  # (m, V)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel has forward-mode formulas
                _, jv = jvp(lambda prm: functional_call(scores, prm, (rows,)), (primals,), (tangents,))  # (m, V) J v
            jv = _at_least_fp32(jv)
            u = p_old * (jv - (p_old * jv).sum(-1, keepdim=True)) / self.fisher_tokens  # H J v
            out = out + _flat_grad(self._scores(rows), self.params, grad_outputs=u)
        return out if one else damping * v + self._sum(out)

    @torch.no_grad()
    def evaluate(self, theta: Tensor) -> dict[str, float]:
        """Load theta; return its L (``surrogate``), exact ``kl`` to pi_old and diagnostics."""
        set_flat_params(self.params, theta)
        totals: dict[str, float] = {}
        for i, rows in enumerate(self.micro):
            for k, v in self._terms(i, self._log_softmax(rows), self.old[i]).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return self._sum_totals(totals)


def trpo_update(ctx: UpdateContext, exp: Experience, advantages: Advantages) -> dict[str, float]:
    """One TRPO step on the policy's trainable parameters (see the module docstring); ``advantages``: (N,)
    one per sequence (:func:`rlmt.train.estimators.sequence_advantages`).

    Metrics, all at the parameters the update leaves (theta_old if rejected): ``loss`` = -L;
    ``trpo/surrogate_gain`` = L(theta) - L(theta_old); ``trpo/kl`` = the exact mean KL(pi_old || pi);
    ``trpo/accepted`` (0/1), ``trpo/step_fraction`` (the accepted ratio^k), ``trpo/step_norm``,
    ``trpo/cg_residual`` = |g - F x|; ``grad_norm`` = |g|; ``skipped_steps`` (1 if g or F x is not finite);
    ``approx_kl`` = k3 on the sampled tokens against the sampler's log-probs; ``kl`` = the KL-to-reference
    estimate (when pg.beta > 0); ``lr`` = 0 (no optimizer).
    """
    tc = ctx.cfg.trpo
    adv = advantages.values
    prob = TrustRegionProblem(ctx, exp, adv)
    out = {"trpo/accepted": 0.0, "trpo/kl": 0.0, "trpo/surrogate_gain": 0.0, "trpo/step_fraction": 0.0,
           "trpo/cg_residual": 0.0, "trpo/step_norm": 0.0, "grad_norm": 0.0, "skipped_steps": 0.0, "lr": 0.0,
           "tokens": prob.n_tokens, **reduce_across(ctx.world, advantages.metrics)}
    if not prob.n_tokens or not prob.params:  # the same decision on every rank
        return {**out, "loss": 0.0, "approx_kl": 0.0}
    was_training = ctx.policy.training
    ctx.policy.eval()
    try:
        start, g = prob.surrogate_gradient()
        final = start
        out["grad_norm"] = float(g.norm())
        theta_old = flat_params(prob.params)
        if not torch.isfinite(g).all():
            out["skipped_steps"] = 1.0
        elif out["grad_norm"] > 0:
            fvp = lambda v: prob.fisher_vector_product(v, tc.cg_damping)  # noqa: E731
            x, out["trpo/cg_residual"], fx = conjugate_gradient(fvp, g, tc.cg_iters)
            shs = float(x @ fx) if torch.isfinite(x).all() else math.nan  # x^T (F + damping I) x
            if not math.isfinite(shs):
                out["skipped_steps"] = 1.0
            elif shs > 0:
                full_step = math.sqrt(2.0 * tc.max_kl / shs) * x
                found = line_search(prob.evaluate, theta_old, full_step, start["surrogate"], tc.max_kl,
                                    tc.backtrack_steps, tc.backtrack_ratio)
                if found is not None:
                    frac, final = found
                    out.update({"trpo/accepted": 1.0, "trpo/kl": final["kl"], "trpo/step_fraction": frac,
                                "trpo/surrogate_gain": final["surrogate"] - start["surrogate"],
                                "trpo/step_norm": frac * float(full_step.norm())})
        if out["trpo/accepted"] == 0.0:
            set_flat_params(prob.params, theta_old)  # bit-exact restore (float32 holds every bf16/fp16 value)
            final = start
    finally:
        ctx.policy.train(was_training)
    out.update({"loss": -final["surrogate"], "approx_kl": final["approx_kl"]})
    if "ref_kl" in final:
        out["kl"] = final["ref_kl"]
    return out
