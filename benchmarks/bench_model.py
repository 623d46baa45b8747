"""Model throughput on this machine: ours next to transformers, same shape, same run.

    .venv/bin/python benchmarks/bench_model.py                  # tiny + gpt2-124m/llama-125m, ~5 min on 1 core
    .venv/bin/python benchmarks/bench_model.py --quick          # tiny only
    .venv/bin/python benchmarks/bench_model.py --big-bf16       # also bf16 at 124M (slow without AVX512-BF16/AMX)

Measures, each as the best of --repeats interleaved runs (ours, theirs, ours, theirs, ...) so
that load from other processes hits both alike:

- train step: forward + backward tokens/s (B x T tokens, loss on every token), fp32 and bf16
  weights, against GPT2LMHeadModel / LlamaForCausalLM built from our exported weights (the
  losses are checked equal first), attention through SDPA in both;
- variants of ours: padded vocabulary (multiple of 64) and a packed row (doc_ids mask);
- greedy generation with a KV cache, tokens/s, against transformers' `generate`;
- MFU = flops_per_token(T) * tokens/s / the measured matmul peak of the same dtype and threads.

Prints a Markdown table (the README's model section holds one run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.hf_export import hf_config, state_dict_to_hf  # noqa: E402
from train.model import CustomLanguageModel, ModelConfig, from_name  # noqa: E402

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, sizes=(128, 256, 512, 1024), reps: int = 5) -> float:
    """Best FLOP/s of square matmuls: the machine's practical peak for this dtype and thread count.

    Both `a @ b` and `F.linear(a, b)` (x @ W^T, what the layers run): on CPUs without native
    bf16 they take different kernels, up to 7x apart.
    """
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for op in (torch.matmul, torch.nn.functional.linear):
            op(a, b)
            k = max(1, int(2e8 // (2 * n**3)))  # ~0.2 GFLOP per timing
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(k):
                    op(a, b)
                best = max(best, 2 * n**3 * k / (time.perf_counter() - t))
    return best


def hf_twin(model: CustomLanguageModel, cfg: ModelConfig):
    """transformers' model of the same architecture holding our weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa")
    sd = state_dict_to_hf(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return hf


def race(fns: dict[str, callable], repeats: int, min_s: float = 0.5) -> dict[str, float]:
    """Interleaved best-of-`repeats` seconds per call; each sample runs enough calls for `min_s`."""
    calls = {}
    for name, f in fns.items():  # warm-up, and how many calls make one sample
        t = time.perf_counter()
        f()
        calls[name] = max(1, round(min_s / max(time.perf_counter() - t, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls[name]):
                f()
            best[name] = min(best[name], (time.perf_counter() - t) / calls[name])
    return best


def train_step(model, idx, targets, hf: bool, **kw):
    def step():
        if hf:
            x = idx[:, :-1]  # T tokens forward, as ours; HF shifts labels itself (T-1 targets)
            loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(idx[:, :-1], targets[:, 1:], **kw)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def bench_train(name: str, cfg: ModelConfig, dtype: str, B: int, T: int, repeats: int, rows: list):
    torch.manual_seed(0)
    ours = CustomLanguageModel(cfg).to(DTYPES[dtype]).train()
    theirs = hf_twin(ours, cfg).to(DTYPES[dtype]).train()
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1))
    with torch.no_grad():  # same weights -> same loss (bf16 loosely)
        x = idx[:, :T]
        a = ours(x[:, :-1], x[:, 1:])[1].item()
        b = theirs(input_ids=x, labels=x).loss.item()
    assert abs(a - b) < (1e-4 if dtype == "fp32" else 5e-2), (a, b)
    padded = CustomLanguageModel(ModelConfig(**{**cfg.__dict__, "pad_vocab_multiple": 64})).to(DTYPES[dtype])
    doc_ids = torch.arange(T)[None].expand(B, T) // max(1, T // 4)  # 4 documents per row
    fns = {
        "ours": train_step(ours, idx, idx, hf=False),
        "transformers": train_step(theirs, idx, idx, hf=True),
        "ours, vocab padded to 64": train_step(padded, idx, idx, hf=False),
        "ours, packed (4 docs/row, SDPA mask)": train_step(ours, idx, idx, hf=False, doc_ids=doc_ids),
    }
    if cfg.vocab_size % 64 == 0:
        del fns["ours, vocab padded to 64"]
    secs = race(fns, repeats)
    ref = secs["transformers"]
    for variant, s in secs.items():
        tps = B * T / s
        rows.append(
            (
                f"| train fwd+bwd | {name} | {dtype} | {variant} | {tps:,.0f} | {ref / s:.2f}x |",
                dtype,
                ours.flops_per_token(T) * tps,
            )
        )  # MFU filled in at the end, against the best peak seen
        print(rows[-1][0], flush=True)


def bench_generate(name: str, cfg: ModelConfig, B: int, prompt: int, new: int, repeats: int, rows: list):
    torch.manual_seed(0)
    ours = CustomLanguageModel(cfg).eval()
    theirs = hf_twin(ours, cfg).eval()
    theirs.generation_config.pad_token_id = 0
    idx = torch.randint(1, cfg.vocab_size, (B, prompt))
    with torch.no_grad():
        a = ours.generate(idx, new, temperature=0)
        b = theirs.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    same = "same tokens" if torch.equal(a, b) else "tokens differ"
    secs = race(
        {
            "ours (KV cache)": lambda: ours.generate(idx, new, temperature=0),
            "transformers generate": lambda: theirs.generate(
                idx, max_new_tokens=new, min_new_tokens=new, do_sample=False
            ),
        },
        repeats,
    )
    ref = secs["transformers generate"]
    for variant, s in secs.items():
        rows.append(
            f"| generate B={B} {prompt}+{new} | {name} | fp32 | {variant} ({same}) | {B * new / s:,.0f} "
            f"| {ref / s:.2f}x | |"
        )
        print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes only")
    ap.add_argument("--big-bf16", action="store_true", help="bf16 train steps for the 124M shapes too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Other processes slow any one measurement down: the peak is the best seen over the run.
    peaks = dict.fromkeys(DTYPES, 0.0)

    def measure_peaks() -> None:
        for d in DTYPES:
            sizes = (128, 256, 512, 1024) if d == "fp32" else (128, 256, 512)  # emulated bf16 is slow
            peaks[d] = max(peaks[d], matmul_peak(DTYPES[d], sizes))

    load = os.getloadavg()[0]
    header = ["| what | shape | dtype | model | tokens/s | vs transformers | MFU |", "|---|---|---|---|---|---|---|"]
    print("\n".join(header))
    rows: list = []
    shapes = [("tiny (gpt2)", from_name("tiny"), 8, 128), ("tiny (llama)", from_name("tiny", **LLAMA), 8, 128)]
    big = [("gpt2-124m", from_name("gpt2-124m"), 4, 256), ("llama-125m", from_name("llama-125m"), 4, 256)]
    for name, cfg, B, T in shapes + ([] if args.quick else big):
        for dtype in ("fp32", "bf16"):
            if dtype == "bf16" and cfg.d_model > 64 and not args.big_bf16:
                continue
            measure_peaks()
            bench_train(name, cfg, dtype, B, T, args.repeats, rows)
    for name, cfg, _, _ in shapes + ([] if args.quick else big):
        new = 64 if cfg.d_model == 64 else 32
        for B in (1, 4):
            bench_generate(name, cfg, B, 32, new, args.repeats, rows)
    measure_peaks()
    # Without native bf16 (no AVX512-BF16/AMX) bf16 matmuls are emulated, and which kernel a
    # shape gets varies so much that a "peak" means nothing: no MFU then.
    if peaks["bf16"] < peaks["fp32"] / 4:
        peaks["bf16"] = 0.0
    print(
        f"\n{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), load avg {load:.1f} at "
        f"start; matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
    )
    print("\n".join(header))
    for row in rows:
        if isinstance(row, tuple):
            text, dtype, flops = row
            row = f"{text} {flops / peaks[dtype]:.1%} |" if peaks[dtype] else f"{text} n/a |"
        print(row)


if __name__ == "__main__":
    main()
