"""Where a verification forward's time goes: bytes, FLOPs and kernels per forward, lopa vs the yardstick.

Four forwards of the Dream-7B shape over a 512-token committed prefix are compared, each as the code runs it:

- ``fast``: lopa's single-sequence fast path (``FastRunner``, ``StaticRows`` K/V access): rows x window padded to the
  bucket, attention over ``kv_len`` = committed + window rounded up to 256 cache slots (512 + 32 -> 768) with a
  boolean key mask; query groups folded into the query axis, so the memory-efficient kernel can take the mask.
- ``yardstick``: ``bench/gpu_floor.py``: same matmuls, attention over exactly P + L keys with no mask (flash with
  grouped-query attention), ONE fused ``rms_norm`` per norm, and no RoPE at all.
- ``fast batch``: the many-sequence graph path (``FastBatchRunner``, ``pooled_forward`` over ``PoolSlots``): 16
  sequences x 5 rows = 80 rows padded to the next power of two (128), the head over every (row, window) position,
  each row's prefix gathered from the pool (``index_select``) and concatenated with the window, a boolean mask, and
  ``enable_gqa``: flash is ruled out by the mask and the memory-efficient kernel by GQA, so attention runs in cuDNN
  or in the composite math backend (fp32 upcast, K/V repeated to every query head, scores materialized), whichever
  torch picks; the table models the math backend (``--batch-attention`` switches the model).
- ``eager batch``: ``BatchRunner`` (``pooled_forward``) on the same 80 rows: no row padding, and no mask when
  every row has a full window over an equal prefix (the benchmark's case), so flash takes it.

Part 1 (computed from the shapes, no device needed): per layer, bytes moved and FLOPs of each kernel group, and
per forward the totals and a roofline lower bound ``sum over kernels of max(bytes / bandwidth, FLOPs / rate)``
at given ceilings (defaults: the H100 figures measured on 2026-11-27, 2.92 TB/s copy and 751 TFLOP/s bf16; an
estimate, not a measurement). Part 2 (measured here): kernels per forward and per layer, counted with
``torch.profiler`` over one forward of each path on ``--profile-shape`` (on CPU: the device kernels the
Python-level ops launch; on CUDA: the CUDA kernels themselves, with their device time). Part 3 (measured here):
host milliseconds spent building and packing the inputs of one forward (``build_batch`` and packing), which the
``fast`` column of bench/gpu_step.py includes. On CUDA, part 4 lists which attention backends accept each of the
four attention calls at the real shapes. Prints the tables, then one JSON line.

    python bench/gpu_account.py                      # CPU: parts 1-3; CUDA: 1-4, part 2 at 7B width, 2 layers
    python bench/gpu_account.py --profile-shape tiny # quicker part 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from lopa.engine.batch import BatchRunner, _stack
from lopa.engine.fast import FastRunner, pack_inputs
from lopa.engine.fast_batch import FastBatchRunner, _pack
from lopa.engine.graphs import round_up
from lopa.engine.runner import build_batch
from lopa.model.config import ModelConfig
from lopa.model.transformer import Transformer


def _sibling(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_step = _sibling("gpu_step")
BF16 = 2  # bytes per element of the model dtype
F32 = 4
KV_GRANULARITY, WINDOW_GRANULARITY = 256, 16  # the fast paths' buckets with graphs (engine/fast.py, fast_batch.py)


@dataclasses.dataclass
class Kernel:
    """One kernel group of one layer (or of the whole forward): bytes read + written and FLOPs."""

    name: str
    bytes: float
    flops: float = 0.0

    def seconds(self, bandwidth: float, rate: float) -> float:
        return max(self.bytes / bandwidth, self.flops / rate)


@dataclasses.dataclass
class Case:
    """One forward: ``rows`` real branch rows of ``window`` tokens over ``prefix`` committed tokens each."""

    name: str
    rows: int  # real rows
    window: int
    prefix: int
    batched: bool  # many sequences (pool) vs one (static cache)


def cases(prefix: int = 512) -> list[Case]:
    """1 x 32 and 8 x 32 on one sequence, and 16 sequences x 5 rows x 32 tokens, over ``prefix`` cached tokens."""
    return [Case("1x32", 1, 32, prefix, False), Case("8x32", 8, 32, prefix, False),
            Case("16 seqs x 5x32", 80, 32, prefix, True)]  # fmt: skip


CASES = cases()


def matmul(name: str, tokens: int, n_in: int, n_out: int, bias: bool = False) -> Kernel:
    weights = n_in * n_out + (n_out if bias else 0)
    return Kernel(name, BF16 * (weights + tokens * (n_in + n_out)), 2.0 * tokens * n_in * n_out)


def fused_attention(name: str, rows: int, c: ModelConfig, window: int, keys: int, mask: bool) -> Kernel:
    """Flash or memory-efficient attention: reads q, K, V (and a mask), writes the output once."""
    q = rows * c.num_attention_heads * window * c.head_dim
    kv = rows * c.num_key_value_heads * keys * c.head_dim
    flops = 4.0 * rows * c.num_attention_heads * window * keys * c.head_dim
    return Kernel(name, BF16 * (2 * q + 2 * kv) + (BF16 * rows * keys if mask else 0), flops)


def math_attention(rows: int, c: ModelConfig, window: int, keys: int) -> list[Kernel]:
    """torch's composite math SDPA with enable_gqa and a mask, bf16 inputs upcast to fp32 (its default)."""
    nh, d = c.num_attention_heads, c.head_dim
    q, kv = rows * nh * window * d, rows * c.num_key_value_heads * keys * d
    kvx, scores = rows * nh * keys * d, rows * nh * window * keys  # K/V repeated to every query head; QK^T
    return [  # aten/src/ATen/native/transformers/attention.cpp, _scaled_dot_product_attention_math
        Kernel("attn(math): q, k, v -> fp32", (BF16 + F32) * (q + 2 * kv)),
        Kernel("attn(math): repeat_interleave K, V to all heads", 2 * F32 * (kv + kvx)),
        Kernel("attn(math): q * s, k^T * s", 2 * F32 * (q + kvx)),
        Kernel("attn(math): scores = q k^T", F32 * (q + kvx + scores), 2.0 * scores * d),
        Kernel("attn(math): add_ mask, _safe_softmax (4 passes)", 30 * scores),
        Kernel("attn(math): scores v", F32 * (scores + kvx + q), 2.0 * scores * d),
        Kernel("attn(math): out and scores -> bf16", (F32 + BF16) * (q + scores)),
    ]


def layer(case: Case, c: ModelConfig, path: str) -> list[Kernel]:
    """Kernel groups of one layer of ``path`` for ``case``: fast | yardstick | fast batch (cuDNN) | fast batch
    (math) | eager batch."""
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    qd, kvd = c.num_attention_heads * d, c.num_key_value_heads * d
    rows, window = case.rows, case.window
    if path == "fast":
        rows, window = min(1 << (rows - 1).bit_length(), rows), round_up(window, WINDOW_GRANULARITY)
    if path.startswith("fast batch"):
        rows, window = 1 << (rows - 1).bit_length(), round_up(window, WINDOW_GRANULARITY)
    t = rows * window
    kind = "fused F.rms_norm" if path == "yardstick" else "lopa: fp32 composite"
    norm = Kernel(f"rmsnorm x2 ({kind})", 2 * (36 if path != "yardstick" else 4) * t * h)
    out = [norm, matmul("qkv_proj (+bias)", t, h, qd + 2 * kvd, c.attention_bias)]
    if path != "yardstick":
        out.append(Kernel("rope on q and k (composite)", 16 * BF16 * t * (qd + kvd)))
    out.append(Kernel("window K/V write", 2 * 2 * BF16 * t * kvd))
    if path == "fast":
        kv_len = round_up(case.prefix + window, KV_GRANULARITY)
        out.append(fused_attention(f"attention (mem-efficient, mask, {kv_len} slots)", rows, c, window, kv_len, True))
    elif path == "yardstick":
        out.append(fused_attention(f"attention (flash, {case.prefix + window} keys)", rows, c, window,
                                   case.prefix + window, False))  # fmt: skip
    else:
        prefix = round_up(case.prefix, KV_GRANULARITY) if path.startswith("fast batch") else case.prefix
        keys, kv = prefix + window, rows * c.num_key_value_heads * prefix * d
        out.append(Kernel("K/V prefix gather from the pool (index_select)", 2 * 2 * BF16 * kv))
        out.append(Kernel("K/V cat(prefix, window)", 2 * BF16 * (2 * kv + 2 * rows * c.num_key_value_heads * keys * d)))
        if path == "eager batch":
            out.append(fused_attention(f"attention (flash, no mask, {keys} keys)", rows, c, window, keys, False))
        elif path.endswith("(math)"):
            out += math_attention(rows, c, window, keys)
        else:
            out.append(fused_attention(f"attention (cuDNN, mask, {keys} keys)", rows, c, window, keys, True))
    out.append(Kernel("attention output to (tokens, heads x dim)", 2 * BF16 * t * qd))
    out.append(matmul("o_proj", t, qd, h))
    out.append(Kernel("residual adds x2", 2 * 3 * BF16 * t * h))
    out.append(matmul("gate_up_proj", t, h, 2 * i))
    out.append(Kernel("silu(gate) * up", BF16 * (2 * t * i + 3 * t * i)))
    out.append(matmul("down_proj", t, i, h))
    return out


def head(case: Case, c: ModelConfig, path: str) -> Kernel:
    """The LM head: over the rows x positions each path computes logits for."""
    rows = case.rows
    if path == "fast":
        rows = min(1 << (rows - 1).bit_length(), rows)
    if path.startswith("fast batch"):
        rows = 1 << (rows - 1).bit_length()  # padded rows too, and every window position (the idx plane is W wide)
    tokens = rows * round_up(case.window, WINDOW_GRANULARITY if path.startswith("fast") else 1)
    return matmul(f"LM head ({tokens} rows)", tokens, c.hidden_size, c.vocab_size)


def account(case: Case, c: ModelConfig, path: str, bandwidth: float, rate: float) -> dict:
    per_layer = layer(case, c, path)
    hd = head(case, c, path)
    n = c.num_hidden_layers
    nbytes = n * sum(k.bytes for k in per_layer) + hd.bytes
    flops = n * sum(k.flops for k in per_layer) + hd.flops
    bound = n * sum(k.seconds(bandwidth, rate) for k in per_layer) + hd.seconds(bandwidth, rate)
    return dict(
        case=case.name, path=path, layer=[dataclasses.asdict(k) for k in per_layer], head=dataclasses.asdict(hd),
        gb=nbytes / 1e9, tflop=flops / 1e12, roofline_ms=bound * 1e3,
    )  # fmt: skip


# ---- part 2: kernels per forward, counted with the profiler ---------------------------------------------------
VIEWS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::slice", "aten::select", "aten::expand", "aten::as_strided",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::narrow", "aten::detach", "aten::alias",
    "aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::lift_fresh", "aten::unbind", "aten::result_type", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::contiguous", "aten::to", "aten::type_as", "aten::numpy_T", "aten::flatten",
    "aten::view_as", "aten::expand_as", "aten::new_empty", "aten::set_", "aten::_has_compatible_shallow_copy_type",
}  # fmt: skip
# ops that are ONE kernel on CUDA whatever the CPU profile shows beneath them (a reduction, a matmul, a gather)
FUSED = {
    "aten::rms_norm", "aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "aten::embedding",
    "aten::mean", "aten::sum", "aten::pow", "aten::rsqrt", "aten::cat", "aten::index_copy_", "aten::gather",
    "aten::index_select", "aten::softmax", "aten::argmax", "aten::copy_", "aten::_to_copy", "aten::clone",
}  # fmt: skip


def _kernels(event) -> Counter:
    """Device kernels one Python-level op launches: 0 for views and no-op casts, 1 for an op whose work is one
    kernel on CUDA (matmuls, fused rms_norm, elementwise), SDPA's mask preparation + 1 for SDPA itself."""
    name, children = event.name, event.cpu_children
    if name == "aten::scaled_dot_product_attention":
        prep = Counter()
        for ch in children:
            if not ch.name.startswith("aten::_scaled_dot_product") and ch.name not in VIEWS:
                prep[f"sdpa mask prep: {ch.name}"] += 1
        return prep + Counter({"sdpa": 1})
    if name in FUSED:
        return Counter({name: 1})
    out = Counter()
    for ch in children:
        out += _kernels(ch)
    if not out and name not in VIEWS and name != "aten::to":  # an op whose children are all views does the work
        out[name] = 1
    return out


def count_kernels(fn, device: str) -> tuple[Counter, dict[str, float]]:
    """Kernels one call of ``fn`` launches, by op (CPU: Python-level ops; CUDA: the CUDA kernels and their µs)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: lazy inits out of the count
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    if device == "cuda":
        counts, micros = Counter(), Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                counts[e.name[:60]] += 1
                micros[e.name[:60]] += e.time_range.elapsed_us()
        return counts, dict(micros)
    counts = Counter()
    for e in prof.events():
        if e.cpu_parent is None:
            counts += _kernels(e)
    return counts, {}


def profile_paths(cfg: ModelConfig, device: str, dtype, window: int, prefix: int) -> dict[str, tuple | str]:
    """Kernel counts of one forward of each path for a model of ``cfg`` (its layers) on ``device``: (counts by
    op, device µs by kernel) per path, or the error that path raised (the other paths are still counted)."""
    model = gpu_step.build(lambda: Transformer(cfg), device, dtype)
    dev, rows, pad, shift = torch.device(device), 8, cfg.padding_id, cfg.logit_shift
    pool_len = prefix + 2 * window + KV_GRANULARITY

    def yardstick() -> tuple:
        yard = gpu_step.yardstick(cfg, device, dtype)
        kc = [torch.zeros(rows, cfg.num_key_value_heads, prefix + window, cfg.head_dim, device=device, dtype=dtype)]
        ids = torch.randint(0, cfg.vocab_size, (rows, window), device=device)
        with torch.no_grad():
            return count_kernels(lambda: yard(ids, kc * cfg.num_hidden_layers, kc * cfg.num_hidden_layers, prefix),
                                 device)  # fmt: skip

    def eager_batch() -> tuple:  # before the fast runners fuse the model's weights in place
        runner = BatchRunner(model, 16, pool_len, dev)
        _, _, args = gpu_step.batch_inputs(runner, cfg, 16, 4, window, prefix)
        return count_kernels(lambda: runner._forward(*args), device)

    def fast() -> tuple:  # the padded forward a graph would capture, run eagerly so the profiler sees its kernels
        runner = FastRunner(model, dev, use_graphs=False, window_granularity=WINDOW_GRANULARITY,
                            kv_granularity=KV_GRANULARITY)  # fmt: skip
        runner.begin(prefix + window, rows=rows)
        runner.cache.committed = runner.cache.written = prefix
        cands = gpu_step.candidates(cfg, rows, window, prefix)
        counts, micros = count_kernels(lambda: runner.raw_logits(prefix, 0, cands), device)
        if device != "cuda":  # on CPU the host-side input building shows up as ops too: take it out
            host, _ = count_kernels(lambda: pack_inputs(build_batch(prefix, 0, cands, pad, shift), rows, window, pad),
                                    device)  # fmt: skip
            counts -= host
        return counts, micros

    def fast_batch() -> tuple:
        runner = FastBatchRunner(model, 16, pool_len, dev, use_graphs=False, window_granularity=WINDOW_GRANULARITY,
                                 kv_granularity=KV_GRANULARITY)  # fmt: skip
        _, _, args = gpu_step.batch_inputs(runner, cfg, 16, 4, window, prefix)
        counts, micros = count_kernels(lambda: runner._forward(*args), device)
        if device != "cuda":
            key = runner.bucket(args[0].shape[0], args[0].shape[1], prefix)
            host, _ = count_kernels(lambda: _pack(*args, key[0], key[1], runner.pad_id), device)
            counts -= host
        return counts, micros

    out: dict[str, tuple | str] = {}
    for name, fn in (("yardstick", yardstick), ("eager batch", eager_batch), ("fast", fast),
                     ("fast batch", fast_batch)):  # fmt: skip
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 (reported in the table and the JSON; the other paths still run)
            out[name] = f"{type(e).__name__}: {e}"
    return out


# ---- part 3: host time of building one forward's inputs -------------------------------------------------------
def host_packing_ms(cfg: ModelConfig, reps: int = 50) -> dict[str, float]:
    """Median host ms of building one forward's inputs: build_batch + padding to the bucket (one sequence), and
    build_batch per sequence + stacking + padding (16 sequences x 5 rows). Both are inside the timed forwards."""

    def median_ms(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    pad, shift, out = cfg.padding_id, cfg.logit_shift, {}
    for rows in (1, 8):
        cands = gpu_step.candidates(cfg, rows, 32, 512)
        out[f"{rows}x32: build_batch + pack_inputs"] = median_ms(
            lambda cands=cands, rows=rows: pack_inputs(build_batch(512, 0, cands, pad, shift), rows, 32, pad)
        )
    plans = [gpu_step.candidates(cfg, 5, 32, 512) for _ in range(16)]
    slots = torch.arange(16).repeat_interleave(5)  # (80,)

    def sixteen() -> None:
        ids, positions, valid, idx = _stack([build_batch(512, 0, cands, pad, shift) for cands in plans], pad)
        _pack(ids, positions, valid, idx, slots, torch.full_like(slots, 512), 128, 32, pad)

    out["16 seqs x 5x32: build_batch x16 + _stack + _pack"] = median_ms(sixteen)
    ids, positions, valid, idx = _stack([build_batch(512, 0, cands, pad, shift) for cands in plans], pad)
    out["16 seqs x 5x32: _pack alone (in FastBatchRunner._forward)"] = median_ms(
        lambda: _pack(ids, positions, valid, idx, slots, torch.full_like(slots, 512), 128, 32, pad)
    )
    return out


# ---- part 4: which attention kernels accept each call (CUDA) --------------------------------------------------
def attention_backends(c: ModelConfig, device: str, dtype) -> dict[str, dict[str, bool]]:
    """For each path's attention call at the real shapes: which SDPA backends run it (each tried alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = nh // nkv

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    calls = {
        "fast 8x32 (folded GQA, mask, 768 slots)": lambda: F.scaled_dot_product_attention(
            t(8, nkv, g * 32, d), t(8, nkv, 768, d), t(8, nkv, 768, d),
            attn_mask=torch.ones(8, 1, 1, 768, dtype=torch.bool, device=device)),
        "yardstick 8x32 (GQA, no mask, 544 keys)": lambda: F.scaled_dot_product_attention(
            t(8, nh, 32, d), t(8, nkv, 544, d), t(8, nkv, 544, d), enable_gqa=True),
        "fast batch 128 rows (GQA, mask, 544 keys)": lambda: F.scaled_dot_product_attention(
            t(128, nh, 32, d), t(128, nkv, 544, d), t(128, nkv, 544, d),
            attn_mask=torch.ones(128, 1, 1, 544, dtype=torch.bool, device=device), enable_gqa=True),
        "eager batch 80 rows (GQA, no mask, 544 keys)": lambda: F.scaled_dot_product_attention(
            t(80, nh, 32, d), t(80, nkv, 544, d), t(80, nkv, 544, d), enable_gqa=True),
    }  # fmt: skip
    backends = {b.name: b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)}  # fmt: skip
    out = {}
    with torch.no_grad():
        for name, call in calls.items():
            ok = {}
            for bname, backend in backends.items():
                try:
                    with sdpa_kernel([backend]):
                        call()
                    ok[bname] = True
                except RuntimeError:
                    ok[bname] = False
            out[name] = ok
    return out


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--bandwidth", type=float, default=2.92e12, help="bytes/s for the roofline (H100 copy, measured)")
    p.add_argument("--tflops", type=float, default=751.0, help="bf16 TFLOP/s for the roofline (H100 8192^3 mm)")
    p.add_argument("--profile-shape", default=None, help="gpu_step shape for part 2 (default: 7b on CUDA, small)")
    p.add_argument("--profile-layers", type=int, default=2)
    p.add_argument("--prefix", type=int, default=512, help="cached tokens of every sequence in part 1")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(a.device).type
    c = gpu_step.model_config("7b")
    bw, rate = a.bandwidth, a.tflops * 1e12

    print(
        f"# PART 1, computed from the shapes: Dream-7B ({c.num_hidden_layers} layers), bf16, {a.prefix}-token prefix."
    )
    print(f"# Roofline: sum over kernels of max(bytes / {bw / 1e12:.2f} TB/s, FLOPs / {a.tflops:.0f} TFLOP/s): an")
    print("# ESTIMATE from ceilings measured on an H100 (../shared/docs/gpu.md), not a measurement of lopa.")
    part1 = []
    paths = {False: ["fast", "yardstick"], True: ["fast batch (cuDNN)", "fast batch (math)", "eager batch"]}
    for case in cases(a.prefix):
        results = [account(case, c, path, bw, rate) for path in paths[case.batched]]
        part1 += results
        print(f"## {case.name}: per layer (x {c.num_hidden_layers}), MB moved | GFLOP of each kernel group")
        print(" | ".join(["kernel group", *(f"{r['path']} MB | GFLOP" for r in results)]))
        for name in dict.fromkeys(k["name"] for r in results for k in r["layer"]):
            cells = []
            for r in results:
                k = next((k for k in r["layer"] if k["name"] == name), None)
                cells.append("- | -" if k is None else f"{k['bytes'] / 1e6:.2f} | {k['flops'] / 1e9:.2f}")
            print(" | ".join([name, *cells]))
        heads = [f"{r['head']['bytes'] / 1e6:.2f} | {r['head']['flops'] / 1e9:.2f}" for r in results]
        rows = ", ".join(r["head"]["name"][9:-1] for r in results)
        print(" | ".join([f"LM head, once per forward ({rows})", *heads]))
        for r in results:
            print(
                f"{case.name} {r['path']}: {r['gb']:.2f} GB, {r['tflop']:.3f} TFLOP, roofline {r['roofline_ms']:.2f} ms"
            )
    part4 = attention_backends(c, a.device, torch.bfloat16) if dev == "cuda" else None
    if part4:
        print("# PART 4, measured: which SDPA backends run each attention call (each backend tried alone)")
        for call, ok in part4.items():
            print(f"{call:<48} | " + ", ".join(f"{b}: {'yes' if v else 'no'}" for b, v in ok.items()))

    shape = a.profile_shape or ("7b" if dev == "cuda" else "small")
    pcfg = dataclasses.replace(gpu_step.model_config(shape), num_hidden_layers=a.profile_layers)
    pcfg1 = dataclasses.replace(pcfg, num_hidden_layers=a.profile_layers - 1) if a.profile_layers > 1 else None
    dtype = torch.bfloat16  # on CPU too: the fp32 casts of lopa's RMSNorm and RoPE only exist in half precision
    counts = profile_paths(pcfg, a.device, dtype, 32, 512)
    fewer = profile_paths(pcfg1, a.device, dtype, 32, 512) if pcfg1 else None
    kind = "CUDA kernels (profiler)" if dev == "cuda" else "kernels of the Python-level ops (CPU profiler)"
    print(f"# PART 2, measured: {kind} per forward, shape {shape} with {a.profile_layers} layers; per layer =")
    print("# the difference to one layer fewer. 8x32 for fast / yardstick, 16 seqs x 5 x 32 for the batch paths.")
    part2 = {}
    for path, result in counts.items():
        if isinstance(result, str) or isinstance(fewer and fewer[path], str):
            error = result if isinstance(result, str) else fewer[path]
            part2[path] = dict(error=error)
            print(f"{path:<12} | FAILED: {error}")
            continue
        cnt, micros = result
        total = sum(cnt.values())
        per_layer = total - sum(fewer[path][0].values()) if fewer else None
        fixed = total - a.profile_layers * per_layer if per_layer is not None else None
        dev_us = sum(micros.values()) if micros else None
        part2[path] = dict(per_forward=total, per_layer=per_layer, outside_layers=fixed, device_us=dev_us,
                           by_op=dict(cnt.most_common()), device_us_by_kernel=micros or None)  # fmt: skip
        per_7b = total + (c.num_hidden_layers - a.profile_layers) * per_layer if per_layer is not None else None
        print(f"{path:<12} | {total:4d} per forward | {per_layer} per layer | {fixed} outside the layers | "
              f"{per_7b} at 28 layers" + (f" | {dev_us:.0f} µs of kernels" if dev_us else ""))  # fmt: skip
        part2[path]["at_28_layers"] = per_7b
        layer_ops = cnt - fewer[path][0] if fewer else cnt
        part2[path]["per_layer_by_op"] = dict(layer_ops.most_common())
        print("    per layer: " + ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in layer_ops.most_common()))

    print("# PART 3, measured on this host: ms to build one forward's inputs (inside gpu_step's fast column)")
    part3 = host_packing_ms(c)
    for k, v in part3.items():
        print(f"{k:<48} | {v:.3f} ms")

    summary = dict(
        bench="gpu_account", device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", torch=torch.__version__,
        ceilings=dict(bandwidth=bw, tflops=a.tflops),
        part1=[{k: v for k, v in r.items() if k != "layer"} for r in part1], part2=part2, part3_host_ms=part3,
        part4_backends=part4,
    )  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
