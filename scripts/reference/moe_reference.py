#!/usr/bin/env python3
"""Independent PyTorch reference of the model in docs/model.md, and the
generator of the test fixtures tests/fixtures/ref_*.bin.

This file owns:
  * a plain float64 implementation of the DeepSeekMoE transformer with the
    routing of auxiliary-loss-free load balancing (forward only; gradients
    come from torch autograd),
  * the fixture cases (configs derived from the `tiny` preset), the random
    parameters they use, and the writer of the named-tensor file format
    described in docs/fixtures.md,
  * the training fixture (10 AdamW steps with gradient clipping and the
    ALF-LB sign rule on the bias),
  * the choice of input tokens that makes every routing decision clear-cut
    (bf16 resolves it) except one designed exact tie per case, which only the
    tie rule decides,
  * self-checks run on every generation: finite differences against
    autograd, gate values against the unbiased affinities, the margin of
    every routing decision, the exactness of the designed tie, and a float32
    re-run that estimates how far a float32 implementation may drift from the
    float64 numbers.

Regenerate every fixture (deterministic, byte-identical on a rerun with the
same PyTorch build; a few minutes): make fixtures, which runs
    $(PY_VENV)/bin/python scripts/reference/moe_reference.py --out tests/fixtures
"""

import argparse
import math
import os
import struct
import sys

try:
    import numpy as np
    import torch
except ImportError as e:
    sys.exit("moe_reference.py needs PyTorch and NumPy (%s): run it with the project's virtual "
             "environment, e.g. make fixtures (which creates build/venv when it is missing)" % e)

F64 = torch.float64
F32 = torch.float32

# ----------------------------------------------------------------------------
# Configuration: the fields of model/config.c's field table, in its order.

CONFIG_FIELDS = [
    ("vocab_size", "int"), ("d_model", "int"), ("n_layers", "int"), ("n_heads", "int"),
    ("seq_len", "int"), ("n_dense", "int"), ("d_ff", "int"), ("n_shared", "int"),
    ("n_routed", "int"), ("d_expert", "int"), ("top_k", "int"), ("gate", "gate"),
    ("norm_topk", "int"), ("route_scale", "float"), ("rms_eps", "float"),
    ("rope_theta", "float"), ("init_std", "float"), ("tie_embeddings", "int"),
]
# Fields written only when they differ from the default (0), so that the
# fixtures of the cases without them stay byte for byte what they were.
OPTIONAL_FIELDS = [("parallel_residual", "int")]

# The `tiny` preset of model/config.c.
TINY = dict(
    vocab_size=64, d_model=32, n_layers=3, n_heads=2, seq_len=16, n_dense=1, d_ff=64,
    n_shared=2, n_routed=8, d_expert=16, top_k=2, gate="sigmoid", norm_topk=1,
    route_scale=1.0, rms_eps=1e-6, rope_theta=10000.0, init_std=0.02, tie_embeddings=0,
    parallel_residual=0,
)


def f32(x):
    """The float32 value nearest to x, as a Python float (the C config stores floats)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def config_text(cfg):
    """The config as key=value lines, formatted like config_write() in C (%d, %.9g, gate name)."""
    lines = []
    for name, kind in CONFIG_FIELDS + [f for f in OPTIONAL_FIELDS if cfg[f[0]]]:
        v = cfg[name]
        if kind == "int":
            lines.append("%s=%d" % (name, v))
        elif kind == "float":
            lines.append("%s=%.9g" % (name, f32(v)))
        else:
            assert v in ("sigmoid", "softmax")
            lines.append("%s=%s" % (name, v))
    return "".join(line + "\n" for line in lines)


def is_moe(cfg, layer):
    return layer >= cfg["n_dense"]


def param_table(cfg):
    """(name, shape, is_matrix) of every parameter, in buffer order (docs/model.md)."""
    V, d, E = cfg["vocab_size"], cfg["d_model"], cfg["n_routed"]
    de, S, dff = cfg["d_expert"], cfg["n_shared"], cfg["d_ff"]
    t = [("tok_emb", (V, d), True)]
    for l in range(cfg["n_layers"]):
        p = "layers.%d." % l
        t += [(p + "attn_norm", (d,), False),
              (p + "attn.wqkv", (3 * d, d), True),
              (p + "attn.wo", (d, d), True),
              (p + "ffn_norm", (d,), False)]
        if not is_moe(cfg, l):
            t += [(p + "ffn.w13", (2 * dff, d), True), (p + "ffn.w2", (d, dff), True)]
        else:
            t += [(p + "moe.router", (E, d), True)]
            if S > 0:
                t += [(p + "moe.shared_w13", (2 * S * de, d), True),
                      (p + "moe.shared_w2", (d, S * de), True)]
            t += [(p + "moe.experts_w13", (E, 2 * de, d), True),
                  (p + "moe.experts_w2", (E, d, de), True)]
    t += [("final_norm", (d,), False)]
    if not cfg["tie_embeddings"]:
        t += [("lm_head", (V, d), True)]
    return t


# ----------------------------------------------------------------------------
# The model (docs/model.md), written for clarity. Works in any float dtype:
# float64 for the fixtures, float32 only to estimate float32 drift.

def rmsnorm(x, w, eps):
    # x (..., d), w (d): x / sqrt(mean(x^2) + eps) * w
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope(u, theta):
    # u (B, T, H, hd), "rotate half": pairs (i, i + hd/2) rotated by angle p * theta^(-2i/hd)
    B, T, H, hd = u.shape
    half = hd // 2
    i = torch.arange(half, dtype=F64)
    freq = theta ** (-2.0 * i / hd)                                    # (hd/2)
    ang = torch.arange(T, dtype=F64)[:, None] * freq[None, :]          # (T, hd/2)
    c = torch.cos(ang).to(u.dtype)[None, :, None, :]                   # (1, T, 1, hd/2)
    s = torch.sin(ang).to(u.dtype)[None, :, None, :]
    u1, u2 = u[..., :half], u[..., half:]
    return torch.cat([u1 * c - u2 * s, u2 * c + u1 * s], dim=-1)


def attention(h, wqkv, wo, B, T, H, theta):
    # h (N, d) -> (N, d)
    N, d = h.shape
    hd = d // H
    qkv = h @ wqkv.T                                                   # (N, 3d)
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    q = rope(q.reshape(B, T, H, hd), theta).transpose(1, 2)            # (B, H, T, hd)
    k = rope(k.reshape(B, T, H, hd), theta).transpose(1, 2)
    v = v.reshape(B, T, H, hd).transpose(1, 2)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)                    # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    a = (att @ v).transpose(1, 2).reshape(N, d)                        # heads concatenated
    return a @ wo.T


def swiglu(h, w13, w2):
    # h (n, in), w13 (2m, in), w2 (out, m) -> (n, out)
    m = w13.shape[0] // 2
    g = h @ w13[:m].T
    u = h @ w13[m:].T
    return ((g * torch.sigmoid(g)) * u) @ w2.T


def select(score, K, tie=None):
    """Top-K of each row of score (N, E): ties to the lower index, listed by
    decreasing score. Returns sel (N, K) and, per token, two margins relative
    to max |score| of the token: `order`, the smallest gap between consecutive
    ranks 1..K+1 (the selection and its listed order), and `boundary`, the gap
    between rank K and rank K+1 (the selected set alone; inf when K = E); and
    where the designed exact tie `tie` = (a, b) (two experts with the same
    router row and bias) fell: `tie_order` (both selected, so only the tie rule
    decides which is listed first) and `tie_boundary` (one at rank K, the other
    at rank K+1, so the tie rule decides which one is selected). A gap of
    exactly 0 between the two experts of `tie` is the designed tie, not a
    small margin, and is left out of the margins."""
    srt = torch.sort(score, dim=1, descending=True, stable=True)   # stable: equal scores keep index order
    sel = srt.indices[:, :K]
    v, idx = srt.values, srt.indices                     # (N, E) decreasing
    N, E = v.shape
    scale = v.abs().max(dim=1).values
    inf = torch.full((N,), float("inf"), dtype=v.dtype)
    last = min(K, E - 1)                                 # gaps rank j -> j+1 for j = 1..last
    gaps = v[:, :last] - v[:, 1:last + 1]                # (N, last)
    designed = torch.zeros_like(gaps, dtype=torch.bool)
    if tie is not None:
        a, b = tie
        lo, hi = idx[:, :last], idx[:, 1:last + 1]
        designed = (gaps == 0) & (((lo == a) & (hi == b)) | ((lo == b) & (hi == a)))
    gaps = torch.where(designed, torch.full_like(gaps, float("inf")), gaps)
    order = gaps.min(dim=1).values / scale if last > 0 else inf
    boundary = gaps[:, K - 1] / scale if K < E else inf
    tie_boundary = designed[:, K - 1] if K < E else torch.zeros(N, dtype=torch.bool)
    tie_order = designed[:, :K - 1].any(dim=1) if K > 1 else torch.zeros(N, dtype=torch.bool)
    return sel, order, boundary, tie_order, tie_boundary


def affinities(logits, gate):
    """s = sigmoid(logits) or softmax over each row of logits (N, E), computed
    one expert (column) at a time: then two experts with equal logits get equal
    affinities bit for bit, which a vectorised exp over whole rows does not
    promise (an element in a vector lane and one in a scalar tail may round
    differently), and the designed ties stay exact."""
    cols = logits.unbind(dim=1)
    if gate == "sigmoid":
        return torch.stack([torch.sigmoid(x) for x in cols], dim=1)
    mx = logits.detach().max(dim=1).values                              # (N) for stability only
    ex = [torch.exp(x - mx) for x in cols]
    z = sum(ex)
    return torch.stack([e / z for e in ex], dim=1)


def forward(params, cfg, route, tokens, targets, bias, fixed_sel=None):
    """params: name -> tensor (all one dtype). route: dict(bias_mult, aux_kind,
    aux_alpha). tokens/targets (B, T) int64. bias (n_moe, E) float32.
    fixed_sel: optional {layer: sel} to hold the routing fixed (for finite
    differences). Returns a dict of outputs, per-layer routing info included."""
    dt = params["tok_emb"].dtype
    B, T = tokens.shape
    N = B * T
    d, H, E, K = cfg["d_model"], cfg["n_heads"], cfg["n_routed"], cfg["top_k"]
    eps, theta, rscale = f32(cfg["rms_eps"]), f32(cfg["rope_theta"]), f32(cfg["route_scale"])
    P = lambda name: params[name]

    x = P("tok_emb")[tokens.reshape(-1)]                               # (N, d)
    aux = torch.zeros((), dtype=dt)
    info = {}
    for l in range(cfg["n_layers"]):
        p = "layers.%d." % l
        h = rmsnorm(x, P(p + "attn_norm"), eps)
        x_in = x                                                       # (N, d) the layer's input
        x = x + attention(h, P(p + "attn.wqkv"), P(p + "attn.wo"), B, T, H, theta)
        # Sequential: the FFN reads x + attn; parallel residual (GPT-NeoX,
        # litgpt): it reads the layer's input, x + attn(norm1 x) + ffn(norm2 x).
        h = rmsnorm(x_in if cfg["parallel_residual"] else x, P(p + "ffn_norm"), eps)  # (N, d)
        if not is_moe(cfg, l):
            x = x + swiglu(h, P(p + "ffn.w13"), P(p + "ffn.w2"))
            continue

        # --- MoE layer ---
        # Router logits (N, E) one expert at a time, as affinities() says why:
        # a matrix product may sum some columns in another order (measured:
        # with E = 6, columns 1 and 4 of equal weights differ in the last bit).
        logits_r = torch.stack([h @ w for w in P(p + "moe.router").unbind(dim=0)], dim=1)
        s = affinities(logits_r, cfg["gate"])                           # (N, E)
        b = bias[l - cfg["n_dense"]].to(dt)                            # (E), row = MoE layer index
        u = logits_r if route.get("bias_logits") else s                # what the bias is added to
        score = u * b if route["bias_mult"] else u + b
        sel, margin, boundary, tie_order, tie_boundary = select(score.detach(), K, route.get("tie"))  # (N, K)
        sel_nobias, margin_nb, _, _, _ = select(u.detach(), K, route.get("tie"))  # selection by u alone
        if fixed_sel is not None:
            sel = fixed_sel[l]
        g = s.gather(1, sel)                                           # (N, K) unbiased affinities
        if cfg["norm_topk"]:
            g = g / g.sum(dim=1, keepdim=True)
        g = g * rscale

        out = torch.zeros_like(h)
        if cfg["n_shared"] > 0:
            out = out + swiglu(h, P(p + "moe.shared_w13"), P(p + "moe.shared_w2"))
        W13, W2 = P(p + "moe.experts_w13"), P(p + "moe.experts_w2")
        for e in range(E):
            tok, slot = (sel == e).nonzero(as_tuple=True)              # tokens routed to e
            if tok.numel() == 0:
                continue
            y = swiglu(h[tok], W13[e], W2[e])                          # (n_e, d)
            out = out.index_add(0, tok, y * g[tok, slot].unsqueeze(1))
        x = x + out

        # --- auxiliary balancing loss (f constant, gradient through P) ---
        onehot = torch.zeros(N, E, dtype=dt)
        onehot.scatter_(1, sel, 1.0)                                   # (N, E): 1 where selected
        counts = onehot.sum(dim=0)                                     # c_i over the batch
        if route["aux_kind"] == 1:                                     # expert-level
            f = E / (K * N) * counts
            Pm = s.mean(dim=0)
            aux = aux + route["aux_alpha"] * (f * Pm).sum()
        elif route["aux_kind"] == 2:                                   # sequence-wise
            f = E / (K * T) * onehot.reshape(B, T, E).sum(dim=1)      # (B, E)
            sn = s / s.sum(dim=1, keepdim=True)
            Pm = sn.reshape(B, T, E).mean(dim=1)                       # (B, E)
            aux = aux + route["aux_alpha"] * (f * Pm).sum(dim=1).mean()
        info[l] = dict(s=s.detach(), u=u.detach(), sel=sel, gates=g.detach(), sel_nobias=sel_nobias,
                       margin=margin, margin_nb=margin_nb, boundary=boundary,
                       tie_order=tie_order, tie_boundary=tie_boundary, counts=counts.detach())

    x = rmsnorm(x, P("final_norm"), eps)
    W_head = P("tok_emb") if cfg["tie_embeddings"] else P("lm_head")
    logits = x @ W_head.T                                              # (N, V)
    loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1))
    return dict(logits=logits.reshape(B, T, -1), loss=loss, aux=aux, info=info)


# ----------------------------------------------------------------------------
# Random cases

MATRIX_STD = 0.2   # large enough that gradients are not tiny
ROUTER_STD = 0.3   # router logits with std ~1.7: decisive routing
NORM_NOISE = 0.1   # norm weights 1 + 0.1 normal, so a norm-weight bug shows
# Smallest relative gap between consecutive routing ranks (docs/fixtures.md,
# "Routing margins"). MARGIN: every stored selection, so float32 and float64
# agree. BF16_MARGIN: the selection with the bias, which the GPU test's bf16
# build must reproduce exactly: its selection scores differ from these by at
# most 1.24e-2 of the token's largest |score| (measured on the emulated bf16
# build, tests/test_gpu.cu reports it), and a gap must absorb the error of two
# scores, so 5e-2 leaves a factor 2. TRAIN_MARGIN: the K-th / (K+1)-th gap of
# every training step, larger because the bf16 build's parameters drift from
# these over the steps.
MARGIN = 1e-3
BF16_MARGIN = 1e-1
TRAIN_MARGIN = 1.5e-1


def draw_case(cfg, route, seed):
    """Parameters (float32) and bias (float32) from one seeded generator, with
    the designed tie route["tie"] = (a, b): expert b gets expert a's router row
    and bias in every MoE layer, so the two have equal affinities and scores
    for every token, exactly, in any precision."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape, is_matrix in param_table(cfg):
        z = torch.randn(shape, generator=gen, dtype=F64)
        if is_matrix:
            std = ROUTER_STD if name.endswith("moe.router") else MATRIX_STD
            params[name] = (std * z).to(F32)
        else:
            params[name] = (1.0 + NORM_NOISE * z).to(F32)
    n_moe, E = cfg["n_layers"] - cfg["n_dense"], cfg["n_routed"]
    z = torch.randn(n_moe, E, generator=gen, dtype=F64)
    if route["bias_mult"]:
        bias = (1.0 + route["bias_std"] * z).clamp(min=0.3) if route["bias_std"] > 0 else torch.ones(n_moe, E, dtype=F64)
    else:
        bias = route["bias_std"] * z
    bias = bias.to(F32)
    if route.get("tie") is not None:
        a, b = route["tie"]
        for l in range(cfg["n_dense"], cfg["n_layers"]):
            params["layers.%d.moe.router" % l][b] = params["layers.%d.moe.router" % l][a]
        bias[:, b] = bias[:, a]
    return params, bias


def bias_moved(info_l, t):
    """Whether the bias changed the selected set of token t in a layer."""
    return not torch.equal(info_l["sel"][t].sort().values, info_l["sel_nobias"][t].sort().values)


def tie_decided(info_l, t):
    """Whether the designed tie sits at the K-th / (K+1)-th boundary of token t
    in a layer: the tie rule alone decides which of the two is selected."""
    return bool(info_l["tie_boundary"][t])


def choose_tokens(params, cfg, route, bias, B, T, gen, good, wants=()):
    """Input tokens (B, T) chosen position by position so that every routing
    decision is clear-cut. Attention is causal and the sequences of a batch
    are independent, so the routing of token t of sequence b depends on
    tokens 0..t of that sequence alone: position t is settled, on a forward of
    that prefix, before t+1. The vocabulary is tried in a random order and the
    first token for which good(info, t) holds (info the prefix forward's
    per-layer routing) is kept. wants: (quota, property) pairs, property(info
    of one layer, t) -> bool: while a MoE layer has fewer than quota tokens
    with a property, a token that adds one is preferred; once every quota is
    met, one with none of them (so that the tie, which always passes good(),
    does not take over the fixture). Returns tokens (B, T), or None when some
    position has no such token (the caller draws new parameters)."""
    V = cfg["vocab_size"]
    tokens = torch.zeros(B, T, dtype=torch.int64)
    have = {}                                            # (layer, want index) -> tokens so far
    for b in range(B):
        for t in range(T):
            prefix, first = tokens[b:b + 1, :t + 1], None
            for v in torch.randperm(V, generator=gen).tolist():
                prefix[0, t] = v
                with torch.no_grad():
                    info = forward(params, cfg, route, prefix, prefix, bias)["info"]
                if not good(info, t):
                    continue
                if first is None:
                    first = (v, info)
                hits = {(l, w) for l in info for w, (_, prop) in enumerate(wants) if prop(info[l], t)}
                short = {(l, w) for l in info for w, (quota, _) in enumerate(wants) if have.get((l, w), 0) < quota}
                if (short and hits & short) or (not short and not hits):
                    first = (v, info)
                    break
            if first is None:
                return None
            prefix[0, t] = first[0]
            for l, i in first[1].items():
                for w, (_, prop) in enumerate(wants):
                    have[(l, w)] = have.get((l, w), 0) + int(prop(i, t))
    return tokens


def as_leaves(params32, dtype):
    return {k: v.to(dtype).clone().requires_grad_(True) for k, v in params32.items()}


def run_forward_backward(params32, cfg, route, tokens, targets, bias, dtype):
    params = as_leaves(params32, dtype)
    out = forward(params, cfg, route, tokens, targets, bias)
    (out["loss"] + out["aux"]).backward()
    grads = {k: v.grad.detach().clone() for k, v in params.items()}
    return out, grads


def min_margin(info, boundary_only=False):
    """Smallest routing margin over the tokens and MoE layers of one forward.
    Fixtures store the selections in order, with and without the bias, so all
    of those must be clear-cut; training only depends on the selected sets."""
    if boundary_only:
        m = [float(i["boundary"].min()) for i in info.values()]
    else:
        m = [float(i["margin"].min()) for i in info.values()] + \
            [float(i["margin_nb"].min()) for i in info.values()]
    return min(m) if m else float("inf")


def fd_check(params32, cfg, route, tokens, targets, bias, grads, sels):
    """Central finite differences in float64 of a few entries of every tensor
    (the largest-gradient entry and two random ones), routing held fixed."""
    gen = torch.Generator().manual_seed(1234)
    h = 1e-5
    worst = 0.0
    base = {k: v.to(F64) for k, v in params32.items()}

    def objective(pp):
        with torch.no_grad():
            o = forward(pp, cfg, route, tokens, targets, bias, fixed_sel=sels)
        return float(o["loss"] + o["aux"])

    for name, g in grads.items():
        flat = g.reshape(-1)
        idx = [int(flat.abs().argmax())] + [int(i) for i in torch.randint(0, flat.numel(), (2,), generator=gen)]
        scale = float(flat.abs().max())
        for i in idx:
            pp = dict(base)
            w = base[name].clone().reshape(-1)
            w0 = float(w[i])
            w[i] = w0 + h
            pp[name] = w.reshape(base[name].shape)
            fp = objective(pp)
            w[i] = w0 - h
            pp[name] = w.reshape(base[name].shape)
            fm = objective(pp)
            fd = (fp - fm) / (2 * h)
            err = abs(fd - float(flat[i])) / max(scale, 1e-12)
            worst = max(worst, err)
            if err > 1e-6:
                raise SystemExit("finite-difference check failed: %s[%d] autograd %.10g fd %.10g"
                                 % (name, i, float(flat[i]), fd))
    return worst


def gate_check(info, cfg):
    """Gate values equal the unbiased affinities of the selected experts
    (normalised when norm_topk), times route_scale, recomputed element by element."""
    worst = 0.0
    for l, i in info.items():
        s, sel, g = i["s"], i["sel"], i["gates"]
        for t in range(sel.shape[0]):
            picked = [float(s[t, int(e)]) for e in sel[t]]
            tot = sum(picked) if cfg["norm_topk"] else 1.0
            for j, a in enumerate(picked):
                want = a / tot * f32(cfg["route_scale"])
                worst = max(worst, abs(want - float(g[t, j])))
    if worst > 1e-12:
        raise SystemExit("gate check failed: max error %g" % worst)
    return worst


def rel_diff(a, b):
    """max |a-b| / max |b| (b the float64 truth)."""
    a, b = a.to(F64), b.to(F64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------
# Fixture file writer (format: docs/fixtures.md)

DTYPES = {"f32": (0, "<f4"), "f64": (1, "<f8"), "i32": (2, "<i4"), "u8": (3, "u1")}


class FixtureWriter:
    def __init__(self):
        self.entries = []   # (name, dtype, np.ndarray)
        self.names = set()

    def add(self, name, dtype, value):
        assert name not in self.names, name
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(value).astype(DTYPES[dtype][1]))
        assert arr.ndim <= 4
        self.names.add(name)
        self.entries.append((name, dtype, arr))

    def add_text(self, name, text):
        self.add(name, "u8", np.frombuffer(text.encode("ascii"), dtype=np.uint8))

    def write(self, path):
        out = bytearray(b"MOEFIXT1")
        out += struct.pack("<II", 1, len(self.entries))
        for name, dtype, arr in self.entries:
            nb = name.encode("ascii")
            out += struct.pack("<I", len(nb)) + nb
            out += struct.pack("<II", DTYPES[dtype][0], arr.ndim)
            out += struct.pack("<%dQ" % arr.ndim, *arr.shape)
            out += arr.tobytes()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(out)
        os.replace(tmp, path)
        return len(out)


def add_header(w, cfg, route, params32, bias):
    w.add_text("config", config_text(cfg))
    w.add("route.bias_mult", "i32", np.int32(route["bias_mult"]))
    w.add("route.aux_kind", "i32", np.int32(route["aux_kind"]))
    w.add("route.aux_alpha", "f64", np.float64(route["aux_alpha"]))
    if route.get("bias_logits"):  # absent: 0, the bias on the affinities
        w.add("route.bias_logits", "i32", np.int32(1))
    for name, _, _ in param_table(cfg):
        w.add(name, "f32", params32[name])
    w.add("bias", "f32", bias)


# ----------------------------------------------------------------------------
# The cases. Each derives from the tiny preset (V=64, d=32, 2 heads,
# seq_len 16); the inner sizes (layers, experts, d_ff, d_expert) are reduced
# where that keeps the files small without losing a code path.
# bias_std: spread of the drawn bias (0: zero bias, or all ones for the
# multiplicative rule). aux_alpha is a power of two so float32 holds it exactly.

def case(name, B, T, bias_mult=0, bias_std=0.0, aux_kind=0, aux_alpha=0.0, seed=0, bias_logits=0, **over):
    cfg = dict(TINY)
    cfg.update(over)
    # Every case has one designed exact tie: experts 1 and E/2 + 1 (not
    # neighbours, so the lower index is not also the nearer one).
    E = cfg["n_routed"]
    route = dict(bias_mult=bias_mult, bias_std=bias_std, aux_kind=aux_kind, aux_alpha=aux_alpha,
                 tie=(1, E // 2 + 1), bias_logits=bias_logits)
    return dict(name=name, cfg=cfg, route=route, B=B, T=T, seed=seed)


SMALL = dict(d_ff=32, d_expert=8)

CASES = [
    # 3 layers, first dense: two MoE layers behind a dense one (bias row = layer - n_dense)
    case("base", 2, 8, bias_std=0.1, seed=100, **SMALL),
    case("softmax_tied", 2, 8, bias_std=0.05, seed=200, n_layers=2, n_dense=0, n_shared=1,
         gate="softmax", norm_topk=0, route_scale=2.5, tie_embeddings=1, **SMALL),
    case("softmax_aux_expert", 2, 16, aux_kind=1, aux_alpha=0.125, seed=300, n_layers=2,
         n_shared=0, n_routed=6, top_k=3, gate="softmax", **SMALL),
    case("sigmoid_aux_seq", 2, 8, bias_std=0.1, aux_kind=2, aux_alpha=0.125, seed=400,
         n_layers=2, n_dense=0, tie_embeddings=1, **SMALL),
    case("mult_bias", 2, 8, bias_mult=1, bias_std=0.3, seed=500, n_layers=2, norm_topk=0, **SMALL),
    case("top1_noshared", 2, 16, bias_std=0.3, seed=600, n_layers=2, n_shared=0, n_routed=4,
         top_k=1, norm_topk=0, tie_embeddings=1, **SMALL),
    case("softmax_mult_seq", 2, 8, bias_mult=1, bias_std=0.3, aux_kind=2, aux_alpha=0.125,
         seed=700, n_layers=2, n_dense=0, n_shared=1, gate="softmax", route_scale=1.5, **SMALL),
    # Han & Zhong's 1B setup in miniature (1b-hz): parallel residual, softmax
    # gate with normalised top-k, the bias on the router logits; a dense first layer.
    case("parallel_logits", 2, 8, bias_std=0.3, seed=900, bias_logits=1, gate="softmax",
         parallel_residual=1, **SMALL),
    case("parallel_sigmoid_seq", 2, 8, bias_std=0.1, aux_kind=2, aux_alpha=0.125, seed=1000, n_layers=2,
         n_dense=0, parallel_residual=1, **SMALL),
]

# seed 805: seeds 800..804 leave some step's position without a clear-cut token.
TRAIN = dict(name="train", cfg=dict(TINY, **SMALL), B=2, T=8, seed=805, steps=10,
             route=dict(bias_mult=0, bias_std=0.0, aux_kind=0, aux_alpha=0.0),
             lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0, gamma=1e-2)


# Tokens per MoE layer whose selected set the tie rule decides, and (where
# the bias is not neutral) that the bias changes.
WANT_TIES = 2
WANT_MOVED = 2


def generate_case(c, outdir):
    cfg, route, B, T = c["cfg"], c["route"], c["B"], c["T"]
    # Parameters, then tokens chosen so that every routing decision is
    # clear-cut (or the designed tie); a new seed when no token fits somewhere.
    def good(info, t):
        return all(float(i["margin"][t]) > BF16_MARGIN and float(i["margin_nb"][t]) > MARGIN
                   for i in info.values())
    for attempt in range(100):
        seed = c["seed"] + attempt
        params32, bias = draw_case(cfg, route, seed)
        gen = torch.Generator().manual_seed(seed + 1000000)
        params64 = {k: v.to(F64) for k, v in params32.items()}
        wants = [(WANT_TIES, tie_decided)]
        if bool((bias != (1.0 if route["bias_mult"] else 0.0)).any()):
            wants.append((WANT_MOVED, bias_moved))
        tokens = choose_tokens(params64, cfg, route, bias, B, T, gen, good, wants)
        if tokens is not None:
            break
        print("  %s: seed %d leaves a position without a clear-cut token, redrawing" % (c["name"], seed))
    targets = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    out, grads = run_forward_backward(params32, cfg, route, tokens, targets, bias, F64)
    info = out["info"]
    mm = min_margin(out["info"])
    if mm <= MARGIN or min(float(i["margin"].min()) for i in info.values()) <= BF16_MARGIN:
        raise SystemExit("case %s: a routing margin below the bound" % c["name"])
    ta, tb = route["tie"]
    if not all(torch.equal(i["s"][:, ta], i["s"][:, tb]) for i in info.values()):
        raise SystemExit("case %s: the designed tie is not exact" % c["name"])
    tie_boundary = [int(i["tie_boundary"].sum()) for i in info.values()]
    tie_order = [int(i["tie_order"].sum()) for i in info.values()]
    if min(tie_boundary) < 1:
        raise SystemExit("case %s: no token's selection depends on the tie rule" % c["name"])

    # Self-checks.
    sels = {l: i["sel"] for l, i in info.items()}
    fd = fd_check(params32, cfg, route, tokens, targets, bias, grads, sels)
    gate_check(info, cfg)
    has_bias = bool((bias != (1.0 if route["bias_mult"] else 0.0)).any())
    changed = 0
    for i in info.values():
        a = i["sel"].sort(dim=1).values
        b = i["sel_nobias"].sort(dim=1).values
        changed += int((a != b).any(dim=1).sum())
    n_route = sum(i["sel"].shape[0] for i in info.values())
    if has_bias and changed == 0:
        raise SystemExit("case %s: the bias changes no selection" % c["name"])
    # float32 re-run: same routing? how far do logits and gradients drift?
    out32, grads32 = run_forward_backward(params32, cfg, route, tokens, targets, bias, F32)
    same = all(torch.equal(out32["info"][l]["sel"], i["sel"]) for l, i in info.items())
    if not same:
        raise SystemExit("case %s: float32 routing differs from float64" % c["name"])
    d_logits = rel_diff(out32["logits"], out["logits"])
    d_grad = max(rel_diff(grads32[k], grads[k]) for k in grads if grads[k].abs().max() > 0)

    w = FixtureWriter()
    add_header(w, cfg, route, params32, bias)
    w.add("route.tie", "i32", np.array(route["tie"], dtype=np.int32))
    w.add("tokens", "i32", tokens)
    w.add("targets", "i32", targets)
    w.add("logits", "f64", out["logits"])
    w.add("loss", "f64", out["loss"])
    w.add("aux_loss", "f64", out["aux"])
    for name, _, _ in param_table(cfg):
        w.add("grad." + name, "f64", grads[name])
    for l, i in info.items():
        w.add("sel.%d" % l, "i32", i["sel"])
        w.add("gates.%d" % l, "f64", i["gates"])
        w.add("sel_nobias.%d" % l, "i32", i["sel_nobias"])
        w.add("affinity.%d" % l, "f64", i["s"])
        if route.get("bias_logits"):  # what the bias is added to, when not the affinities
            w.add("route_score.%d" % l, "f64", i["u"])
    path = os.path.join(outdir, "ref_%s.bin" % c["name"])
    size = w.write(path)
    print("%-20s seed %d  loss %.6f aux %.6f  margin %.1e (with the bias %.1e)  bias changes %d/%d "
          "selections  tie (%d, %d) decides %s selected and %s orders per layer  fd err %.1e  "
          "f32 drift: logits %.1e grads %.1e  -> %s (%d bytes)"
          % (c["name"], seed, float(out["loss"]), float(out["aux"]), mm,
             min(float(i["margin"].min()) for i in info.values()), changed, n_route, ta, tb,
             "/".join(map(str, tie_boundary)), "/".join(map(str, tie_order)), fd, d_logits, d_grad,
             os.path.basename(path), size))


def train(params32, bias0, cfg, route, tokens, targets, t, dtype, choose=None):
    """t["steps"] steps of AdamW (torch.optim.AdamW) + clipping + the ALF-LB sign rule.
    tokens/targets (steps, B, T). choose: None, or a function (params, bias) ->
    the tokens and targets (B, T) of the step about to run, written into tokens
    and targets (None when it finds none: train returns None). Returns losses,
    grad norms, final params, final bias, per-step counts (steps, n_moe, E),
    smallest routing margin, selections."""
    params = as_leaves(params32, dtype)
    table = param_table(cfg)
    decay = [params[n] for n, _, m in table if m]
    no_decay = [params[n] for n, _, m in table if not m]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=t["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"], foreach=False)
    bias = bias0.clone()                                  # float32, as in the trainers
    gamma = torch.tensor(t["gamma"], dtype=F32)
    K, E = cfg["top_k"], cfg["n_routed"]
    losses, norms, counts, sels, margin = [], [], [], [], float("inf")
    plist = [params[n] for n, _, _ in table]
    for step in range(t["steps"]):
        opt.zero_grad(set_to_none=True)
        if choose is not None:
            chosen = choose({k: v.detach() for k, v in params.items()}, bias)
            if chosen is None:
                return None
            tokens[step], targets[step] = chosen
        out = forward(params, cfg, route, tokens[step], targets[step], bias)
        (out["loss"] + out["aux"]).backward()
        norm = torch.nn.utils.clip_grad_norm_(plist, t["clip"])   # returns the norm before clipping
        opt.step()
        losses.append(float(out["loss"]))
        norms.append(float(norm))
        margin = min(margin, min_margin(out["info"], boundary_only=True))
        # ALF-LB sign rule, with the counts of the batch just routed.
        N = tokens[step].numel()
        mean = K * N / E
        c = torch.stack([out["info"][l]["counts"].to(F64) for l in sorted(out["info"])])   # (n_moe, E)
        counts.append(c.to(torch.int32))
        sels.append([out["info"][l]["sel"] for l in sorted(out["info"])])
        bias = bias + gamma * torch.sign(mean - c).to(F32)   # float32 arithmetic
    final = {n: params[n].detach().clone() for n, _, _ in table}
    return losses, norms, final, bias, torch.stack(counts), margin, sels


def generate_train(t, outdir):
    cfg, route, B, T, S = t["cfg"], t["route"], t["B"], t["T"], t["steps"]
    # Each step's tokens are chosen, from the parameters and bias that step
    # starts with, so that every token's selected set is clear-cut
    # (TRAIN_MARGIN); a new seed when no token fits somewhere.
    def good(info, t):
        return all(float(i["boundary"][t]) > TRAIN_MARGIN for i in info.values())
    for attempt in range(100):
        seed = t["seed"] + attempt
        params32, bias0 = draw_case(cfg, route, seed)
        gen = torch.Generator().manual_seed(seed + 1000000)
        # The target of a token is a fixed random map of it: something to
        # learn, so that the loss falls over the steps (a run that does not
        # update what the forward sees stands out).
        target_of = torch.randperm(cfg["vocab_size"], generator=gen)
        tokens = torch.zeros(S, B, T, dtype=torch.int64)
        targets = torch.zeros(S, B, T, dtype=torch.int64)

        def choose(params, bias):
            tk = choose_tokens(params, cfg, route, bias, B, T, gen, good)
            return None if tk is None else (tk, target_of[tk])
        res = train(params32, bias0, cfg, route, tokens, targets, t, F64, choose)
        if res is not None:
            break
        print("  train: seed %d leaves a position without a clear-cut token, redrawing" % seed)
    losses, norms, final, bias, counts, margin, sels = res
    if margin <= TRAIN_MARGIN:
        raise SystemExit("train: a routing margin %.2e below the bound" % margin)
    # float32 re-run: same routing at every step? how far do the final parameters drift?
    r32 = train(params32, bias0, cfg, route, tokens, targets, t, F32)
    for s64, s32 in zip(sels, r32[6]):
        if not all(torch.equal(a, b) for a, b in zip(s64, s32)):
            raise SystemExit("train: float32 routing differs from float64")
    d_param = max(float((r32[2][n].to(F64) - final[n]).abs().max()) for n in final)
    d_loss = max(abs(a - b) for a, b in zip(r32[0], losses))
    if not torch.equal(r32[3], bias):
        raise SystemExit("train: float32 bias trajectory differs")

    w = FixtureWriter()
    add_header(w, cfg, route, params32, bias0)
    w.add("train.tokens", "i32", tokens)
    w.add("train.targets", "i32", targets)
    w.add("train.losses", "f64", torch.tensor(losses, dtype=F64))
    w.add("train.grad_norms", "f64", torch.tensor(norms, dtype=F64))
    w.add("train.counts", "i32", counts)
    for name, _, _ in param_table(cfg):
        w.add("train.final." + name, "f64", final[name])
    w.add("train.final_bias", "f64", bias.to(F64))
    for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "clip", "gamma"):
        w.add("train." + k, "f64", np.float64(t[k]))
    path = os.path.join(outdir, "ref_train.bin")
    size = w.write(path)
    print("%-20s seed %d  losses %.4f -> %.4f  grad norms %.3f..%.3f  margin %.1e  "
          "f32 drift: params %.1e (abs) losses %.1e  bias range [%.2f, %.2f]  -> %s (%d bytes)"
          % ("train", seed, losses[0], losses[-1], min(norms), max(norms), margin, d_param,
             d_loss, float(bias.min()), float(bias.max()), os.path.basename(path), size))


def main():
    ap = argparse.ArgumentParser(
        description="Float64 PyTorch reference of the MoE model (docs/model.md); writes the "
                    "test fixtures ref_<case>.bin (format: docs/fixtures.md) and self-checks them.")
    ap.add_argument("--out", default="tests/fixtures", help="output folder (default: tests/fixtures)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--only", nargs="+", metavar="CASE", help="write only these cases (names as --list shows)")
    args = ap.parse_args()
    if args.list:
        for c in CASES:
            print(c["name"], c["route"], {k: c["cfg"][k] for k in c["cfg"] if c["cfg"][k] != TINY[k]})
        print("train", TRAIN["route"])
        return
    torch.set_num_threads(1)            # one thread: reductions in a fixed order, reproducible bytes
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    known = [c["name"] for c in CASES] + ["train"]
    for name in args.only or []:
        if name not in known:
            ap.error("--only: unknown case '%s' (one of %s)" % (name, ", ".join(known)))
    for c in CASES:
        if not args.only or c["name"] in args.only:
            generate_case(c, args.out)
    if not args.only or "train" in args.only:
        generate_train(TRAIN, args.out)
    print("all self-checks passed")


if __name__ == "__main__":
    sys.exit(main())
