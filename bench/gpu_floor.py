"""Yardstick for the GPU step benchmark (run it in the SAME call as yours, on the same card).
What one GPU can do: a minimal Dream-7B-shaped forward (random bf16 weights,
static KV cache, SDPA with GQA, fused qkv / gate_up) captured in a CUDA graph.
Times one LoPA verification forward: B branches x L window tokens over a P-token cache."""

import json
import statistics

import torch
import torch.nn.functional as F

dev, dt = "cuda", torch.bfloat16
H, I, NL, NH, NKV, V, D = 3584, 18944, 28, 28, 4, 152064, 128


def W(*s):
    return torch.randn(*s, device=dev, dtype=dt) * 0.02


layers = [
    dict(
        qkv=W(H, H + 2 * NKV * D),
        qkvb=W(H + 2 * NKV * D),
        o=W(H, H),
        gu=W(H, 2 * I),
        dn=W(I, H),
        n1=torch.ones(H, device=dev, dtype=dt),
        n2=torch.ones(H, device=dev, dtype=dt),
    )
    for _ in range(NL)
]
emb, head = W(V, H), W(H, V)


def rms(x, w):
    return F.rms_norm(x, (H,), w, 1e-6)


def fwd(ids, kc, vc, P):
    B, L = ids.shape
    x = emb[ids]
    for l, w in enumerate(layers):
        h = rms(x, w["n1"])
        qkv = torch.addmm(w["qkvb"], h.view(-1, H), w["qkv"]).view(B, L, -1)
        q, k, v = qkv.split([H, NKV * D, NKV * D], -1)
        q = q.view(B, L, NH, D).transpose(1, 2)
        kc[l][:, :, P : P + L] = k.view(B, L, NKV, D).transpose(1, 2)
        vc[l][:, :, P : P + L] = v.view(B, L, NKV, D).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, kc[l][:, :, : P + L], vc[l][:, :, : P + L], enable_gqa=True)
        x = x + (a.transpose(1, 2).reshape(B * L, H) @ w["o"]).view(B, L, H)
        h = rms(x, w["n2"]).view(-1, H)
        g, u = (h @ w["gu"]).chunk(2, -1)
        x = x + ((F.silu(g) * u) @ w["dn"]).view(B, L, H)
    return rms(x, layers[0]["n2"]) @ head


def bench(fn, warm=3, rep=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


rows = []
P = 512
with torch.no_grad():
    for B in [1, 4, 8, 16]:
        for L in [32, 64]:
            kc = [torch.zeros(B, NKV, P + L, D, device=dev, dtype=dt) for _ in range(NL)]
            vc = [torch.zeros(B, NKV, P + L, D, device=dev, dtype=dt) for _ in range(NL)]
            ids = torch.randint(0, V, (B, L), device=dev)
            eager = bench(lambda: fwd(ids, kc, vc, P))  # noqa: B023, F821 (called before the loop moves on)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fwd(ids, kc, vc, P)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fwd(ids, kc, vc, P)
            graph = bench(g.replay)
            rows.append(dict(branches=B, window=L, eager_ms=round(eager, 2), graph_ms=round(graph, 2)))
            print(rows[-1], flush=True)
            del kc, vc, g, out
            torch.cuda.empty_cache()
print(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}))
