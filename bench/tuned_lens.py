"""Held-out KL of the logit lens, the least-squares jump lens and a tuned-lens training recipe, per layer.

Trains on lb.sample_texts()[:16] and evaluates every lens on the same 256 held-out positions of texts 20-23
(``train_tuned_lens(heldout=...)`` draws them with the same seed in every run). Writes bench/RESULTS-tuned-lens.md.

    python -m bench.tuned_lens --optimizer sgd --lr 1 --n-steps 60 --tokens-per-step 64
    python -m bench.tuned_lens --quick    # 10 steps on 1024 tokens: a smoke run

``--sweep LAYERS CONFIG...`` instead trains candidate optimisers on a subset of layers only (the objective is a sum
over layers and each translator acts on its own layer, so layers train independently up to global gradient
clipping, which Adam is insensitive to) and prints their held-out KL beside the logit and jump lenses. CONFIG is
``adam:LR:STEPS:TOKENS`` (plain Adam, warmup 5% + cosine decay), ``wadam:...`` / ``wsgd:...`` (the same with
inputs whitened by the Cholesky factor of E[x x^T] + ridge, x = [h, 1], i.e. K-FAC's input-side preconditioner;
V = 0 is still the zero-initialised translator), or ``kfac:LR:STEPS:TOKENS[:DAMP]`` (K-FAC natural-gradient steps
with both factors: input E[a a^T] exact, output the sampled-token Fisher at h', running average 0.9, each damped by
DAMP × its mean diagonal; :func:`kfac_train`). Example:

    python -m bench.tuned_lens --sweep 3,10,17,24 adam:1e-3:60:32 wsgd:0.1:60:32
"""

from __future__ import annotations

import math
import os
import time

import torch

import lensbench as lb
from bench._harness import HERE, command, machine_info, machine_line, parser, write_results


def _kl(m, X, la, W, b) -> float:
    with torch.no_grad():
        flp = torch.log_softmax(m.unembed(X[-1]), -1)
        h = X[la] + X[la] @ W.T + b
        return float((flp.exp() * (flp - torch.log_softmax(m.unembed(h), -1))).sum(-1).mean())


def sweep(layers: list[int], configs: list[str], max_tokens: int = 4096) -> None:
    from lensbench.capture import windows
    from lensbench.probes import lens as lens_mod
    m = lb.load()
    texts = lb.sample_texts()
    d, L = m.d_model, m.n_layers
    g = torch.Generator().manual_seed(0)
    H = lens_mod._capture_tokens(m, windows(m, texts[:16], 256), max_tokens, g, False)
    Hh = lens_mod._capture_tokens(m, windows(m, texts[20:24], 256), 256, g, False)
    N = H.shape[1]
    Cinv, base = [], {}
    for la in layers:
        X = torch.cat([H[la].double(), torch.ones(N, 1, dtype=torch.float64)], 1)
        S = X.T @ X / N
        S += 1e-2 * float(S.diagonal()[:-1].mean()) * torch.eye(d + 1, dtype=torch.float64)
        Wx = torch.linalg.solve(S * N, X.T @ H[L].double())  # the jump lens (same ridge as init="lstsq")
        Wj, bj = (Wx[:-1].T - torch.eye(d, dtype=torch.float64)).float(), Wx[-1].float()
        base[la] = (_kl(m, Hh, la, torch.zeros(d, d), torch.zeros(d)), _kl(m, Hh, la, Wj, bj))
        Cinv.append(torch.linalg.inv(torch.linalg.cholesky(S)).float())
    Ci = torch.stack(Cinv)
    print("layers", layers, "| logit", [round(base[la][0], 2) for la in layers],
          "| jump", [round(base[la][1], 2) for la in layers], flush=True)
    for cfg in configs:
        kind, lr, steps, B = cfg.split(":")[:4]
        lr, steps, B = float(lr), int(steps), int(B)
        if kind == "kfac":
            damp = float(cfg.split(":")[4]) if cfg.count(":") >= 4 else 1e-3
            t0 = time.perf_counter()
            Ms = kfac_train(m, H, layers, lr, steps, B, damp)
            dt = time.perf_counter() - t0
            out = [_kl(m, Hh, la, M[:, :d], M[:, d]) for la, M in zip(layers, Ms)]
            print(f"{cfg}: {dt:.0f} s, tuned {[round(x, 2) for x in out]}, below jump at "
                  f"{sum(o < base[la][1] for o, la in zip(out, layers))}/{len(layers)}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            continue
        white = kind.startswith("w")
        g = torch.Generator().manual_seed(0)
        V = torch.zeros(len(layers), d, d + 1, requires_grad=True)
        opt = (torch.optim.SGD([V], lr=lr, momentum=0.9, nesterov=True) if kind.endswith("sgd")
               else torch.optim.Adam([V], lr=lr))
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, warm=warm, steps=steps: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))

        def affine(j: int, V=V, white=white) -> torch.Tensor:
            return V[j] @ Ci[j] if white else V[j]
        t0 = time.perf_counter()
        for _ in range(steps):
            pos = torch.randperm(N, generator=g)[:B]
            with torch.no_grad():
                flp = torch.log_softmax(m.unembed(H[L, pos]), -1)
                fp = flp.exp()
                nh = (fp * flp).sum(-1)
            opt.zero_grad()
            for j, la in enumerate(layers):
                M = affine(j)
                h = H[la, pos]
                lp = torch.log_softmax(m.unembed(h + h @ M[:, :d].T + M[:, d]), -1)
                (nh - (fp * lp).sum(-1)).mean().backward()
            opt.step()
            sched.step()
        dt = time.perf_counter() - t0
        out = []
        for j, la in enumerate(layers):
            M = affine(j).detach()
            out.append(_kl(m, Hh, la, M[:, :d], M[:, d]))
        print(f"{cfg}: {dt:.0f} s ({dt / steps / B / len(layers) * L:.3f} s per token-step for all {L} layers), "
              f"tuned {[round(x, 2) for x in out]}, below jump at "
              f"{sum(o < base[la][1] for o, la in zip(out, layers))}/{len(layers)}; load {os.getloadavg()[0]:.2f}",
              flush=True)


def kfac_train(m, H: torch.Tensor, layers: list[int], lr: float, steps: int, B: int, damp: float,
               seed: int = 0) -> list[torch.Tensor]:
    """Zero-initialised residual translators ``M = [W, b]`` (h' = h + W h + b) trained on KL(p_L || p_l) with
    K-FAC natural-gradient steps: input factor ``A = E[a a^T]`` (a = [h, 1], exact over all captured positions),
    output factor ``G = E[g~ g~^T]`` with g~ the gradient at h' of the log-likelihood of a token *sampled from p_l*
    (the Fisher, running average), step ``-lr (G + λ)^-1 grad (A + λ)^-1`` (λ relative to each factor's mean
    diagonal). Exactly the tuned-lens objective; only the optimiser differs."""
    d, L, N = m.d_model, m.n_layers, H.shape[1]
    g = torch.Generator().manual_seed(seed)
    out = []
    for la in layers:
        X = torch.cat([H[la], torch.ones(N, 1)], 1).double()
        A = X.T @ X / N
        A += damp * float(A.diagonal().mean()) * torch.eye(d + 1, dtype=torch.float64)
        Ai = torch.linalg.inv(A).float()
        M = torch.zeros(d, d + 1)
        G = None
        for _ in range(steps):
            pos = torch.randperm(N, generator=g)[:B]
            with torch.no_grad():
                fp = torch.softmax(m.unembed(H[L, pos]), -1)
            a = X[pos].float()
            hp = (H[la, pos] + a @ M.T).requires_grad_(True)
            lp = torch.log_softmax(m.unembed(hp), -1)
            kl = -(fp * lp).sum()  # + const
            y = torch.multinomial(lp.detach().exp(), 1, generator=g)
            gs, = torch.autograd.grad(lp.gather(1, y).sum(), hp, retain_graph=True)
            gk, = torch.autograd.grad(kl, hp)
            Gs = (gs.T @ gs / B).double()
            G = Gs if G is None else 0.9 * G + 0.1 * Gs
            Gd = G + damp * float(G.diagonal().mean()) * torch.eye(d, dtype=torch.float64)
            grad = gk.T @ a / B  # [d, d+1]
            M = M - lr * (torch.linalg.solve(Gd, grad.double()).float() @ Ai)
        out.append(M)
    return out


def main(argv=None) -> None:
    ap = parser(__doc__, HERE / "RESULTS-tuned-lens.md", quick="10 steps on at most 1024 tokens")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--n-steps", "--steps", dest="n_steps", type=int, default=None, help="training steps (default 60)")
    ap.add_argument("--tokens-per-step", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None, help="training tokens (default 4096)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", nargs="+", metavar="LAYERS CONFIG")
    a = ap.parse_args(argv)
    a.n_steps = a.n_steps if a.n_steps is not None else (10 if a.quick else 60)
    a.max_tokens = a.max_tokens or (1024 if a.quick else 4096)
    torch.set_num_threads(a.threads)
    if a.sweep:
        return sweep([int(x) for x in a.sweep[0].split(",")], a.sweep[1:], a.max_tokens)
    m = lb.load()
    texts = lb.sample_texts()
    train, held = texts[:16], texts[20:24]
    common = dict(heldout=held, heldout_tokens=256, max_tokens=a.max_tokens, progress=False, seed=0)
    jump = lb.train_tuned_lens(m, train, init="lstsq", n_steps=0, **common)
    t0 = time.perf_counter()
    mach = machine_info()
    tl = lb.train_tuned_lens(m, train, optimizer=a.optimizer, lr=a.lr, n_steps=a.n_steps,
                             tokens_per_step=a.tokens_per_step, **common)
    secs = time.perf_counter() - t0
    load = os.getloadavg()
    logit, jk, tk = tl.heldout_kl[0], jump.heldout_kl[0], tl.heldout_kl[-1]
    L = len(tk)
    beat_logit, beat_jump = int((tk < logit).sum()), int((tk < jk).sum())
    rows = [f"| {la} | {logit[la]:.2f} | {jk[la]:.2f} | {tk[la]:.2f} |" for la in range(L)]
    recipe = (f"optimizer={a.optimizer}, lr={a.lr}, steps={a.n_steps}, tokens_per_step={a.tokens_per_step}, "
              f"max_tokens={a.max_tokens}, init=identity")
    cmd = command("bench.tuned_lens", [x for k, v in vars(a).items() if k not in ("out", "quick", "sweep")
                                       for x in (f"--{k.replace('_', '-')}", str(v))])
    text = [
        "# Tuned lens on the default model: held-out KL(p_L || p_l) per layer [nats]", "",
        f"Model {m.name}, L={L}; trained on lb.sample_texts()[:16], 256 held-out positions of texts 20-23.",
        f"Recipe: {recipe}. Training time {secs:.0f} s with {a.threads} thread(s), load average "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min) at the end. {machine_line(mach)}", "",
        f"Mean over layers: logit {logit.mean():.2f}, jump (least squares, init='lstsq', steps=0) {jk.mean():.2f}, "
        f"tuned {tk.mean():.2f}. Tuned below logit at {beat_logit}/{L} layers, below jump at {beat_jump}/{L}.", "",
        "Held-out curve of the tuned run (mean over layers): " + ", ".join(
            f"step {s}: {v:.2f}" for s, v in zip(tl.heldout_steps, tl.heldout_kl.mean(1).tolist())), "",
        "| layer | logit | jump | tuned |", "|---:|---:|---:|---:|", *rows, "",
        f"Reproduce (from the repository root): `{cmd}`", ""]
    write_results(a.out, text, cmd)


if __name__ == "__main__":
    main()
