"""Side-by-side baseline for `codelsi-bench train`: PEFT + transformers LoRA training on the same
model (the default GGUF, dequantised to f32 by transformers), the same 512-token row and the
same setting (r=16, alpha=32, dropout 0.05, all seven projections, AdamW lr 2e-4, clip 1.0).

    python3 benches/peft_baseline.py --gguf ~/.cache/codelsi/models/SmolLM2-135M-Instruct.Q4_1.gguf [--device cuda] [--threads 2]
    python3 benches/peft_baseline.py --hf /tmp/random-7b --device cuda --dtype bf16

`--hf` takes an HF folder (benches/make_random_llama.py writes random-weight ones); `--dtype bf16`
holds the frozen base in bf16 (the LoRA weights stay f32, autocast runs the products in bf16).

Prints tokens/s (after one warm-up step) and peak memory (CUDA: max allocated; CPU: max RSS).
"""

import argparse
import os
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--hf")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if not (args.gguf or args.hf):
        ap.error("--gguf FILE or --hf FOLDER")
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.hf:
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.hf, "tokenizer.json"))
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(args.device)
    else:
        d, f = os.path.split(os.path.abspath(args.gguf))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).to(args.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    text = ("export function parse(input: string): Token[] {\n  const out: Token[] = [];\n"
            "  for (const c of input) { out.push({ kind: kindOf(c), text: c }); }\n  return out;\n}\n")
    ids = tok.encode(text * 64, add_special_tokens=False)[: args.seq]
    x = torch.tensor([ids], device=args.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    model.train()

    def step():
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=args.dtype == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (max RSS)"
    dt = (time.time() - t) / args.steps
    print(f"peft {torch.__version__} {args.device} {args.dtype}: seq {len(ids)}, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable: "
          f"{len(ids) / dt:.1f} tok/s ({dt:.2f} s/step), peak {peak}")


if __name__ == "__main__":
    main()
