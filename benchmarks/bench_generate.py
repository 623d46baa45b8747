"""Generation speed: ZeroLLM's KV-cache generate vs transformers' `model.generate`, same model and prompts.

    .venv/bin/python benchmarks/bench_generate.py [--new-tokens 32,128] [--reps 6] [--threads 2]
    .venv/bin/python benchmarks/bench_generate.py --threads 1 --clock cpu   # ratios on a busy machine

Ours: train/model.py `generate` (a preallocated KV cache; what train/rollout.generate calls for
GRPO/PPO rollouts and evals). Theirs: transformers' `generate` on the same weights exported with
train/hf_export.export_hf (its default DynamicCache; what TRL's GRPOTrainer samples with). The
model, tokenizer and prompts are bench_posttrain's: a ~6M-parameter Llama-style model (random
init), 8 hh-rlhf prompts (dialogues up to the last "Assistant:", within 192 tokens) left-padded
into one batch. Sampling at temperature 1 (top-k and top-p off) and greedy; eos off on both
sides, so each call makes exactly 8 x new tokens. Calls alternate (ours, theirs, ours, ...) and
the first of each is dropped; tokens/s = new tokens / seconds of whole calls (the prompt's
prefill included); fp32, `--threads` torch threads. Greedy also checks both pick the same tokens.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_posttrain as bp  # noqa: E402  (the same model, tokenizer and prompts)

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
BATCH = 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--new-tokens", default="32,128", help="comma-separated max new tokens")
    p.add_argument("--reps", type=int, default=6, help="calls per side and setting (the first dropped)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="cpu: this process's CPU seconds")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from train.chat_data import generation_prompt, load_chat_tokenizer
    from train.rollout import left_pad

    torch.set_num_threads(a.threads)
    clock = CLOCKS[a.clock]
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        work = Path(tmp)
        prep = bp.prepare(work)
        tok = load_chat_tokenizer(work / "tok")
        msgs = random.Random(0).sample(prep["prompts"], BATCH)
        ids, mask = left_pad([generation_prompt(tok, [*m, {"role": "assistant", "content": "x"}]) for m in msgs],
                             tok.pad_token_id)  # fmt: skip
        ours = prep["model"].eval()
        hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # no early stop: both make BATCH x n tokens
        rows = []
        for n in map(int, a.new_tokens.split(",")):
            for greedy in (False, True):
                config = GenerationConfig(max_new_tokens=n, do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
                                          eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
                secs, out = {"ours": 0.0, "hf": 0.0}, {}
                for k in range(a.reps):
                    for side in secs:
                        torch.manual_seed(k)
                        t0 = clock()
                        with torch.no_grad():
                            if side == "ours":
                                gen = torch.Generator().manual_seed(k)
                                temp = 0.0 if greedy else 1.0
                                out[side] = ours.generate(ids, n, temperature=temp, attention_mask=mask, generator=gen)
                            else:
                                out[side] = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                        if k:
                            secs[side] += clock() - t0
                new = {side: o[:, ids.size(1) :] for side, o in out.items()}
                assert all(v.shape == (BATCH, n) for v in new.values()), {s: v.shape for s, v in new.items()}
                same = f"{100 * float((new['ours'] == new['hf']).float().mean()):.0f}%" if greedy else ""
                tps = {side: BATCH * n * (a.reps - 1) / s for side, s in secs.items()}
                rows.append((("greedy" if greedy else "sample, T=1"), n, tps["ours"], tps["hf"], same))
                print(f"{rows[-1][0]}, {n} new tokens: ours {tps['ours']:,.0f}, HF {tps['hf']:,.0f} tokens/s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"\nmodel: {prep['params']:,} parameters (Llama-style, 5 x 256), batch {BATCH} left-padded hh prompts "
          f"({int(mask.sum(1).min())}-{ids.size(1)} tokens), fp32, {a.threads} threads, {a.clock} clock; "
          f"transformers {transformers.__version__}; {a.reps - 1} calls per cell\n")  # fmt: skip
    print("| decoding | new tokens | ZeroLLM tokens/s | transformers tokens/s | ours / transformers "
          "| greedy tokens equal |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, n, o, h, same in rows:
        print(f"| {mode} | {n} | {o:,.0f} | {h:,.0f} | **{o / h:.2f}x** | {same} |")


if __name__ == "__main__":
    main()
