"""PEFT fixtures for codelsi's adapter tests, made with PyPI `peft` on the default model.

Run from the repository root (needs: pip install torch transformers gguf peft safetensors):

    python3 tests/scripts/make_peft_fixture.py --gguf ~/.cache/codelsi/models/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/peft_lora/ (a PEFT adapter: r=2, alpha=6, all seven projections, random
A and B so it changes the output, stored as f16 to keep the fixture small) and
tests/fixtures/peft_lora_golden.json (greedy tokens and top-5 logits per step with the adapter
and without it, computed by PEFT in f32 with the f16-rounded adapter weights).

    python3 tests/scripts/make_peft_fixture.py --gguf ... --check DIR --prompt-ids 1,2,3 --codelsi-json out.json

loads an adapter that codelsi wrote into PEFT and compares PEFT's greedy tokens and top-5
log-probabilities with `codelsi generate --adapter DIR --format json` output.
"""

import argparse
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
N_STEPS = 16


def load_base(gguf_path):
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return model


def greedy(model, ids, steps, k=5, logprobs=False):
    ids = list(ids)
    out = {"tokens": [], "top_ids": [], "top_values": []}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if logprobs:
                logits = torch.log_softmax(logits, -1)
            top = torch.topk(logits, k)
            out["top_ids"].append(top.indices.tolist())
            out["top_values"].append([round(v, 5) for v in top.values.tolist()])
            nxt = int(torch.argmax(logits))
            out["tokens"].append(nxt)
            ids.append(nxt)
    return out


def make(gguf_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    golden = json.load(open(os.path.join(FIX, "smollm2_golden.json")))
    prompt_ids = golden["cases"][0]["prompt_ids"]
    torch.manual_seed(0)
    base = load_base(gguf_path)
    base_out = greedy(base, prompt_ids, N_STEPS)
    cfg = LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_((torch.randn_like(p) * 0.05).half().float())
            elif "lora_B" in name:
                p.copy_((torch.randn_like(p) * 0.05).half().float())
    model.eval()
    out_dir = os.path.join(FIX, "peft_lora")
    model.save_pretrained(out_dir)
    st = os.path.join(out_dir, "adapter_model.safetensors")
    tensors = {k: v.half() for k, v in load_file(st).items()}
    save_file(tensors, st, metadata={"format": "pt"})
    # Keep the fixture free of this machine's paths and of PEFT's generated model card.
    os.remove(os.path.join(out_dir, "README.md"))
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    cfg_json = json.load(open(cfg_path))
    cfg_json["base_model_name_or_path"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(cfg_path, "w") as fh:
        json.dump(cfg_json, fh, indent=2, sort_keys=True)
    adapted = greedy(model, prompt_ids, N_STEPS)
    with open(os.path.join(FIX, "peft_lora_golden.json"), "w") as fh:
        json.dump({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "peft": __import__("peft").__version__,
                   "prompt_ids": prompt_ids, "adapted": adapted, "base": base_out}, fh, indent=1)
    print(f"{len(tensors)} adapter tensors; base tokens {base_out['tokens'][:8]}…, "
          f"adapted {adapted['tokens'][:8]}…")


def check(gguf_path, adapter_dir, prompt_ids, codelsi_json):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(gguf_path), adapter_dir)
    model.eval()
    ours = json.load(open(codelsi_json))
    steps = len(ours["token_ids"])
    peft_out = greedy(model, prompt_ids, steps, logprobs=True)
    worst = 0.0
    for step, top in enumerate(ours["top_logprobs"]):
        for entry in top:
            tid, lp = entry["id"], entry["logprob"]
            if tid in peft_out["top_ids"][step]:
                j = peft_out["top_ids"][step].index(tid)
                worst = max(worst, abs(peft_out["top_values"][step][j] - lp))
    same = peft_out["tokens"] == ours["token_ids"]
    print(json.dumps({"peft_loaded": True, "same_greedy_tokens": same, "steps": steps,
                      "worst_top5_logprob_diff": worst}))
    if not same or worst > 2e-3:
        raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--check")
    ap.add_argument("--prompt-ids")
    ap.add_argument("--codelsi-json")
    args = ap.parse_args()
    if args.check:
        ids = [int(x) for x in args.prompt_ids.split(",")]
        check(args.gguf, args.check, ids, args.codelsi_json)
    else:
        make(args.gguf)


if __name__ == "__main__":
    main()
