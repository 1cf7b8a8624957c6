#!/usr/bin/env python3
"""The PyTorch peer: the project's DeepSeekMoE (docs/model.md) with ALF-LB,
written the way a PyTorch user would write it, to time the project against.

Same shapes (a model config of the project), the same initialisation scale
(matrices normal(0, init_std), norm weights 1, biases 0), the same training
step: cross-entropy, global-norm clipping, AdamW with decayed matrices and
undecayed norms, the LR schedule's warmup + cosine or constant rate, and the
sign-rule bias update b += gamma * sign(mean - c) from the step's counts
(Wang et al., arXiv 2408.15664). Two ways to run it:

  --mode eager      plain modules, the routed experts as a Python loop over
                    experts (what a first implementation looks like);
  --mode compiled   torch.compile of the model, the routed experts as two
                    torch._grouped_mm calls over the expert-sorted tokens,
                    scaled_dot_product_attention forced to flash attention,
                    bf16 autocast, fused AdamW -- each where the installed
                    torch and device have it; what is missing falls back with
                    a note (on a CPU: fp32, default attention kernel).

It reads the project's shards and can start from a project checkpoint
(--init-from; --init-opt-state also takes the AdamW moments and the step),
so that tests/test_peers.sh can require the same losses and routing counts
as train_moe. Speed is reported as the trainer reports it: tokens per second
of each step (wall time, device synchronised), in a JSON-lines log with the
trainer's field names, and the median over the steps after --skip-steps.

  moe_torch.py --model-config small.txt --train-data 'data/train_*.bin' -b 8 --steps 20 --mode compiled
"""

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import project_io

# ----------------------------------------------------------------------------
# The model


class SwiGLU(nn.Module):
    """silu(x W_g^T) * (x W_u^T), then W_2; W_g and W_u stacked in w13 as the project stores them."""

    def __init__(self, d, hidden):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


class Attention(nn.Module):
    def __init__(self, cfg, flash):
        super().__init__()
        d, H, T = cfg["d_model"], cfg["n_heads"], cfg["seq_len"]
        self.H, self.hd, self.flash = H, d // H, flash
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        # RoPE tables in float64, rounded once, as the project computes them.
        i = torch.arange(self.hd // 2, dtype=torch.float64)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * cfg["rope_theta"] ** (-2.0 * i / self.hd)
        self.register_buffer("cos", torch.cos(ang).float(), persistent=False)  # (T, hd/2)
        self.register_buffer("sin", torch.sin(ang).float(), persistent=False)

    def rope(self, u):
        # u (B, T, H, hd), rotate-half form: pairs (i, i + hd/2)
        T, half = u.shape[1], self.hd // 2
        c, s = self.cos[:T, None, :].to(u.dtype), self.sin[:T, None, :].to(u.dtype)
        u1, u2 = u[..., :half], u[..., half:]
        return torch.cat([u1 * c - u2 * s, u2 * c + u1 * s], dim=-1)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.H, self.hd).unbind(2)  # each (B, T, H, hd)
        q, k = self.rope(q), self.rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                  # (B, H, T, hd)
        if self.flash:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


class MoE(nn.Module):
    """Shared experts + top-K of E routed experts; selection by affinity + bias."""

    def __init__(self, cfg, grouped, bias_logits=False):
        super().__init__()
        d, E, de, S = cfg["d_model"], cfg["n_routed"], cfg["d_expert"], cfg["n_shared"]
        self.cfg, self.grouped, self.bias_logits = cfg, grouped, bias_logits
        self.router = nn.Linear(d, E, bias=False)
        self.shared = SwiGLU(d, S * de) if S > 0 else None
        self.experts_w13 = nn.Parameter(torch.empty(E, 2 * de, d))  # (E, 2de, d)
        self.experts_w2 = nn.Parameter(torch.empty(E, d, de))        # (E, d, de)
        # The ALF-LB bias: fp32, no gradient, moved by the update after each step.
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x):
        # x (N, d) -> out (N, d), counts (E)
        c, N = self.cfg, x.shape[0]
        E, K = c["n_routed"], c["top_k"]
        logits = self.router(x).float()                                   # (N, E)
        s = torch.sigmoid(logits) if c["gate"] == "sigmoid" else logits.softmax(dim=-1)
        u = logits if self.bias_logits else s                             # (N, E) what the bias is added to
        sel = torch.topk(u.detach() + self.bias, K, dim=-1).indices      # (N, K): the bias picks, never weighs
        gates = s.gather(1, sel)                                          # (N, K)
        if c["norm_topk"]:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        gates = gates * c["route_scale"]
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, sel.reshape(-1), torch.ones(N * K, dtype=torch.int64, device=x.device))
        routed = self.experts_grouped(x, sel, gates, counts) if self.grouped else self.experts_loop(x, sel, gates)
        out = routed if self.shared is None else routed + self.shared(x)
        return out, counts

    def experts_loop(self, x, sel, gates):
        out = torch.zeros_like(x)
        for e in range(self.cfg["n_routed"]):
            tok, slot = (sel == e).nonzero(as_tuple=True)                 # the tokens routed to e
            if tok.numel() == 0:
                continue
            g, u = (x[tok] @ self.experts_w13[e].T).chunk(2, dim=-1)
            y = (F.silu(g) * u) @ self.experts_w2[e].T                    # (n_e, d)
            out.index_add_(0, tok, (y * gates[tok, slot, None]).to(out.dtype))
        return out

    def experts_grouped(self, x, sel, gates, counts):
        # Slots sorted by expert (stable: by token within an expert), so expert e
        # owns rows offs[e-1]..offs[e] of one (N K, d) matrix: two grouped GEMMs.
        K = self.cfg["top_k"]
        order = torch.argsort(sel.reshape(-1), stable=True)               # (N K)
        tok = order // K
        offs = torch.cumsum(counts, 0).to(torch.int32)                    # (E) row ends
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x[tok].to(dt)                                                # (N K, d)
        h = torch._grouped_mm(xs, self.experts_w13.to(dt).transpose(-2, -1), offs=offs)  # (N K, 2de)
        g, u = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(g) * u, self.experts_w2.to(dt).transpose(-2, -1), offs=offs)  # (N K, d)
        y = y * gates.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros(x.shape, dtype=y.dtype, device=x.device).index_add_(0, tok, y)


class Block(nn.Module):
    def __init__(self, cfg, layer, opts):
        super().__init__()
        d, eps = cfg["d_model"], cfg["rms_eps"]
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.attn = Attention(cfg, opts.flash)
        self.ffn_norm = nn.RMSNorm(d, eps=eps)
        self.is_moe = layer >= cfg["n_dense"]
        self.ffn = MoE(cfg, opts.grouped, opts.bias_on == "logits") if self.is_moe else SwiGLU(d, cfg["d_ff"])
        self.parallel = bool(cfg.get("parallel_residual", 0))  # x + attn(norm1 x) + ffn(norm2 x)

    def forward(self, x):
        # x (B, T, d) -> x, counts (E) or None
        h = self.ffn_norm(x) if self.parallel else None
        x = x + self.attn(self.attn_norm(x))
        if h is None:
            h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        out, counts = self.ffn(h.reshape(-1, h.shape[-1]))
        return x + out.view_as(h).to(x.dtype), counts


class DeepSeekMoE(nn.Module):
    def __init__(self, cfg, opts):
        super().__init__()
        d, V = cfg["d_model"], cfg["vocab_size"]
        self.cfg = cfg
        self.tok_emb = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(cfg, l, opts) for l in range(cfg["n_layers"]))
        self.final_norm = nn.RMSNorm(d, eps=cfg["rms_eps"])
        self.lm_head = None if cfg["tie_embeddings"] else nn.Linear(d, V, bias=False)

    def forward(self, tokens, targets):
        # tokens, targets (B, T) -> mean cross-entropy, counts (n_moe, E)
        x = self.tok_emb(tokens)
        counts = []
        for block in self.layers:
            x, c = block(x)
            if c is not None:
                counts.append(c)
        x = self.final_norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.tok_emb.weight.T
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, torch.stack(counts)

    def named_project_params(self):
        """(project name, parameter, is_matrix) in the project's buffer order (param_table)."""
        mods = {"tok_emb": self.tok_emb.weight, "final_norm": self.final_norm.weight}
        if self.lm_head is not None:
            mods["lm_head"] = self.lm_head.weight
        for l, b in enumerate(self.layers):
            p = "layers.%d." % l
            mods[p + "attn_norm"] = b.attn_norm.weight
            mods[p + "attn.wqkv"] = b.attn.wqkv.weight
            mods[p + "attn.wo"] = b.attn.wo.weight
            mods[p + "ffn_norm"] = b.ffn_norm.weight
            if not b.is_moe:
                mods[p + "ffn.w13"], mods[p + "ffn.w2"] = b.ffn.w13.weight, b.ffn.w2.weight
                continue
            mods[p + "moe.router"] = b.ffn.router.weight
            if b.ffn.shared is not None:
                mods[p + "moe.shared_w13"] = b.ffn.shared.w13.weight
                mods[p + "moe.shared_w2"] = b.ffn.shared.w2.weight
            mods[p + "moe.experts_w13"] = b.ffn.experts_w13
            mods[p + "moe.experts_w2"] = b.ffn.experts_w2
        return [(name, mods[name], is_matrix) for name, _, is_matrix in project_io.param_table(self.cfg)]

    def moe_blocks(self):
        return [b.ffn for b in self.layers if b.is_moe]


# ----------------------------------------------------------------------------
# Training pieces the trainer has: LR schedule, bias update, data


def lr_at(a, step):
    """train/lr.h: linear warmup over W steps, then constant or cosine to lr_min at --steps."""
    W = a.warmup_steps
    if step < W:
        return a.lr * (step + 1) / W
    if a.lr_schedule == "const":
        return a.lr
    p = min(max((step - W) / max(a.steps - W, 1), 0.0), 1.0)
    return a.lr_min + (a.lr - a.lr_min) * (1 + math.cos(math.pi * p)) / 2


def bias_update(blocks, counts, gamma, K, n_tokens):
    """model/balance.c's sign rule: b_i += gamma * sign(K N - E c_i), formed in
    double from the fp32 gamma and rounded once to fp32."""
    g = float(np.float32(gamma))
    for moe, c in zip(blocks, counts):
        E = c.numel()
        step = g * torch.sign(K * n_tokens - E * c.to(torch.float64))
        moe.bias.copy_((moe.bias.double() + step.to(moe.bias.device)).float())


class Batches:
    """Windows of T+1 tokens starting at multiples of T, as the project's
    loader cuts them (docs/data.md), in a shuffled order per epoch. With as
    many windows as one micro-batch, every batch holds all of them, which is
    what tests/test_peers.sh relies on to feed both trainers the same tokens."""

    def __init__(self, pattern, B, T, seed):
        self.shards, self.vocab = project_io.read_shards(pattern)
        self.windows = [(s, j) for s, sh in enumerate(self.shards) for j in range((len(sh) - 1) // T)]
        if len(self.windows) < B:
            raise ValueError("%s: %d windows of %d tokens, fewer than one micro-batch of %d"
                             % (pattern, len(self.windows), T + 1, B))
        self.B, self.T, self.rng, self.order = B, T, np.random.default_rng(seed), []

    def next(self):
        if len(self.order) < self.B:
            self.order = list(self.rng.permutation(len(self.windows)))
        pick, self.order = self.order[:self.B], self.order[self.B:]
        rows = [np.asarray(self.shards[s][j * self.T: j * self.T + self.T + 1], dtype=np.int64)
                for s, j in (self.windows[i] for i in pick)]
        w = torch.from_numpy(np.stack(rows))                              # (B, T+1)
        return w[:, :-1], w[:, 1:]


# ----------------------------------------------------------------------------
# Setup: what the device and the installed torch offer


def resolve_options(a, dev):
    """Fills a.grouped, a.flash, a.fused, a.autocast for the mode; returns notes on fallbacks."""
    notes = []
    compiled = a.mode == "compiled"
    a.autocast = a.dtype == "bf16"
    a.grouped = compiled and hasattr(torch, "_grouped_mm")
    if compiled and not a.grouped:
        notes.append("torch %s has no torch._grouped_mm: expert loop" % torch.__version__)
    if a.grouped:
        # A tiny grouped GEMM in the run's dtype: older GPUs and builds reject it.
        dt = torch.bfloat16 if a.autocast else torch.float32
        try:
            x = torch.ones(16, 16, device=dev, dtype=dt)
            w = torch.ones(2, 16, 16, device=dev, dtype=dt)
            torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([8, 16], device=dev, dtype=torch.int32))
        except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
            a.grouped = False
            notes.append("torch._grouped_mm unusable on %s in %s (%s): expert loop"
                         % (dev, a.dtype, str(e).splitlines()[0]))
    a.flash = compiled and dev.type == "cuda" and a.autocast
    if compiled and not a.flash:
        notes.append("flash attention needs a CUDA device and bf16: default attention kernel")
    a.fused = compiled
    if compiled and a.dtype == "fp32" and dev.type == "cpu":
        notes.append("bf16 autocast off on the CPU: fp32 like the project's CPU trainer")
    return notes


def build(a, cfg, dev):
    torch.manual_seed(a.seed)
    model = DeepSeekMoE(cfg, a)
    std = cfg["init_std"]
    with torch.no_grad():
        for _, p, is_matrix in model.named_project_params():
            if is_matrix:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)
    model.to(dev)
    params = model.named_project_params()
    groups = [dict(params=[p for _, p, m in params if m], weight_decay=a.weight_decay),
              dict(params=[p for _, p, m in params if not m], weight_decay=0.0)]
    extra = dict(fused=True) if a.fused else {}
    try:
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.adam_eps, **extra)
    except (RuntimeError, ValueError) as e:
        print("note: fused AdamW unavailable (%s): the default implementation" % e)
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.adam_eps)
    return model, opt


def load_checkpoint(a, model, opt, cfg, dev):
    """Parameters and biases (and with --init-opt-state the AdamW moments and
    the step) of a project checkpoint. Returns the step to continue from."""
    ck = project_io.Checkpoint(a.init_from)
    if ck.config() != cfg:
        raise ValueError("%s holds another model than --model-config" % a.init_from)
    values = ck.tensors(cfg, "params")
    params = model.named_project_params()
    with torch.no_grad():
        for name, p, _ in params:
            p.copy_(torch.from_numpy(values[name].copy()))
        bias = ck.array("bias", 2).reshape(-1, cfg["n_routed"])
        for moe, b in zip(model.moe_blocks(), bias):
            moe.bias.copy_(torch.from_numpy(b.copy()))
    step = 0
    if a.init_opt_state:
        step = int(ck.array("step", 4)[0])
        m, v = ck.tensors(cfg, "adam_m"), ck.tensors(cfg, "adam_v")
        for name, p, _ in params:
            # Fused AdamW keeps its step count on the device, the others on the host.
            opt.state[p] = dict(step=torch.tensor(float(step), device=dev if a.fused else "cpu"),
                                exp_avg=torch.from_numpy(m[name].copy()).to(dev),
                                exp_avg_sq=torch.from_numpy(v[name].copy()).to(dev))
    ck.close()
    return step


# ----------------------------------------------------------------------------
# Main


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer of the project's MoE trainer (see the module doc).")
    ap.add_argument("--model-config", required=True, help="key=value model file (train_moe --print-config)")
    ap.add_argument("--train-data", required=True, help="token shards, a glob (docs/data.md)")
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="bf16: autocast (fp32 master weights); auto: bf16 on CUDA, fp32 on a CPU")
    ap.add_argument("-b", "--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="last step (0-based count, as the trainer's --steps)")
    ap.add_argument("--skip-steps", type=int, default=2,
                    help="steps left out of the median (compilation, allocator warm-up)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-min", type=float, default=1e-4)
    ap.add_argument("--lr-schedule", choices=("cosine", "const"), default="cosine")
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=1e-3, help="ALF-LB bias step (sign rule, constant)")
    ap.add_argument("--bias-on", choices=("scores", "logits"), default="scores",
                    help="the bias is added to the affinities (scores) or to the router logits (the trainer's --bias-on)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--init-from", default="", help="start from this project checkpoint's parameters and biases")
    ap.add_argument("--init-opt-state", action="store_true", help="with --init-from: also AdamW moments and step")
    ap.add_argument("--log", default="", help="JSON-lines log (step records with the trainer's field names)")
    a = ap.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       "cpu" if a.device == "auto" else a.device)
    if a.dtype == "auto":
        a.dtype = "bf16" if dev.type == "cuda" else "fp32"
    try:
        cfg = project_io.read_config_file(a.model_config)
        if cfg["gate"] not in ("sigmoid", "softmax"):
            raise ValueError("gate %s" % cfg["gate"])
        data = Batches(a.train_data, a.micro_batch, cfg["seq_len"], a.seed)
        if data.vocab > cfg["vocab_size"]:
            raise ValueError("%s: vocabulary %d, the model has %d" % (a.train_data, data.vocab, cfg["vocab_size"]))
    except (OSError, ValueError) as e:
        sys.exit("moe_torch.py: error: %s" % e)
    notes = resolve_options(a, dev)
    model, opt = build(a, cfg, dev)
    first = 0
    if a.init_from:
        try:
            first = load_checkpoint(a, model, opt, cfg, dev)
        except (OSError, ValueError) as e:
            sys.exit("moe_torch.py: error: %s" % e)
    step_fn = torch.compile(model) if a.mode == "compiled" else model
    n_params = sum(p.numel() for _, p, _ in model.named_project_params())
    print("peer %s on %s (%s, torch %s): %d parameters, experts by %s, attention %s, AdamW %s"
          % (a.mode, dev, a.dtype, torch.__version__, n_params, "torch._grouped_mm" if a.grouped else "a loop",
             "flash (forced)" if a.flash else "SDPA default", "fused" if a.fused else "default"))
    for n in notes:
        print("note: " + n)

    log = open(a.log, "a") if a.log else None
    B, T, K = a.micro_batch, cfg["seq_len"], cfg["top_k"]
    plist = [p for _, p, _ in model.named_project_params()]
    rates = []
    for step in range(first, a.steps):
        tokens, targets = (t.to(dev, non_blocking=True) for t in data.next())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        lr = lr_at(a, step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.autocast):
            loss, counts = step_fn(tokens, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plist, a.grad_clip) if a.grad_clip > 0 else torch.zeros(())
        opt.step()
        counts = counts.cpu()                                             # the host needs them: a sync
        bias_update(model.moe_blocks(), counts, a.gamma, K, B * T)
        loss_v, norm_v = float(loss.detach()), float(norm)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        tps = B * T / dt
        if step - first >= a.skip_steps:
            rates.append(tps)
        print("step %5d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.0f tok/s" % (step + 1, a.steps, loss_v, lr,
                                                                                 norm_v, tps))
        if log:
            log.write(json.dumps(dict(type="step", step=step + 1, loss=loss_v, grad_norm=norm_v, lr=lr,
                                      tokens_per_s=round(tps, 1), step_time_s=round(dt, 4),
                                      loads=counts.tolist()), separators=(",", ":")) + "\n")
            log.flush()
    if rates:
        print("peer %s: %.0f tokens/s (median of %d steps; min %.0f, max %.0f)"
              % (a.mode, statistics.median(rates), len(rates), min(rates), max(rates)))
    if log:
        log.close()


if __name__ == "__main__":
    main()
