"""Golden fixtures for codelsi's tests, made by an independent implementation (HF transformers).

Run from the repository root (needs: pip install torch transformers gguf safetensors numpy):

    python3 tests/scripts/make_golden.py --gguf ~/.cache/codelsi/models/SmolLM2-135M-Instruct.Q4_1.gguf

Writes, under tests/fixtures/:
  smollm2_golden.json   prompt ids, 32 greedy tokens and top-5 logits per step (default model)
  smollm2_tokenizer.json code strings and their token ids
  qwen_coder_golden.json the same for Qwen2.5-Coder-0.5B-Instruct Q4_K_M (with --qwen PATH;
                        its tokenizer cases inside)
  tiny_llama/, tiny_qwen2/  random-weight HF-format models (safetensors) and their golden outputs
  kquants.json          random blocks of every GGUF type we read (Q4_0 … Q6_K, Q2_K, Q3_K, IQ4_NL,
                        IQ4_XS) and gguf-py's dequantisation

transformers loads the GGUF by dequantising every weight to float32, so its logits are those of
the quantised model computed in f32: the same numbers our kernels compute in registers.
"""

import argparse
import json
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")

CODE_PROMPTS = [
    "function fibonacci(n: number): number {",
    "// Return the sum of all even numbers in the array.\nexport function sumEven(xs: number[]): number {\n",
    "interface User {\n  id: number;\n  name: string;\n}\n\nfunction findUser(users: User[], id: number)",
]
CHAT_PROMPT = "Write a TypeScript function that reverses a string."
TOKENIZER_STRINGS = [
    "const x = 42;",
    "function add(a: number, b: number): number { return a + b; }",
    "  if (i % 3 === 0) {\n\t\treturn 'Fizz';\n  }",
    "let π = 3.14159; // unicode — and émojis 🚀",
    "<|im_start|>user\nhello<|im_end|>\n",
    "x=1234567890;y=0.5e-10",
    "",
    "   leading and trailing spaces   ",
    "class Foo<T extends Bar> implements Baz {}\n\n\n",
    "import { readFile } from 'node:fs/promises';",
]
N_GREEDY = 32


def fix_smollm_pretokenizer(tok):
    """SmolLM2's own tokenizer.json splits digits one by one before the byte-level split, as
    llama.cpp does for `tokenizer.ggml.pre = smollm`; transformers' GGUF converter has no entry for
    `smollm` and leaves the plain GPT-2 split. Put the model's real pre-tokenizer back."""
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def greedy_with_top5(model, ids, steps, k=5):
    """Greedy decode with a full forward per step (no cache: the plainest possible reference)."""
    ids = list(ids)
    out = {"tokens": [], "top_ids": [], "top_logits": []}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top = torch.topk(logits, k)
            out["top_ids"].append(top.indices.tolist())
            out["top_logits"].append([round(v, 5) for v in top.values.tolist()])
            nxt = int(torch.argmax(logits))
            out["tokens"].append(nxt)
            ids.append(nxt)
    return out


def golden_cases(tok, model):
    """The code prompts as text and the chat prompt through the chat template, each with its
    prompt ids and greedy continuation."""
    cases = []
    for p in CODE_PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        cases.append({"prompt": p, "chat": False, "prompt_ids": ids, **greedy_with_top5(model, ids, N_GREEDY)})
    chat_text = tok.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(chat_text, add_special_tokens=False)
    cases.append(
        {"prompt": CHAT_PROMPT, "chat": True, "rendered": chat_text, "prompt_ids": ids,
         **greedy_with_top5(model, ids, N_GREEDY)}
    )
    return cases


def smollm2(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    fix_smollm_pretokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()

    cases = golden_cases(tok, model)
    with open(os.path.join(FIX, "smollm2_golden.json"), "w") as fh:
        json.dump({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "cases": cases}, fh, indent=1)

    toks = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in TOKENIZER_STRINGS]
    with open(os.path.join(FIX, "smollm2_tokenizer.json"), "w") as fh:
        json.dump(toks, fh, indent=1)


def qwen_coder(gguf_path):
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q5_0, Q8_0, Q4_K, Q6_K): the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cases = golden_cases(tok, model)
    toks = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in TOKENIZER_STRINGS]
    with open(os.path.join(FIX, "qwen_coder_golden.json"), "w") as fh:
        json.dump({"model": f, "cases": cases, "tokenizer": toks}, fh, indent=1)


def byte_tokenizer(path, vocab_size):
    """A byte-level BPE with no merges: 256 byte tokens plus <s>, </s>; small enough to commit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<s>", "</s>"])
    t.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<s>assistant: {% endif %}"}, fh)


def tiny(name, cfg_cls, model_cls, dtype, **cfg):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = cfg_cls(**cfg)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF inits norms at 1 and biases at 0: make every weight matter.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    path = os.path.join(FIX, name)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    byte_tokenizer(path, cfg["vocab_size"])
    # Reference logits from the weights as stored (rounded to `dtype`), computed in f32.
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    prompt = [256] + list(b"function add(a, b) {")
    golden = greedy_with_top5(model, prompt, 16)
    with torch.no_grad():
        last = model(torch.tensor([prompt])).logits[0, -1].tolist()
    with open(os.path.join(path, "golden.json"), "w") as fh:
        json.dump({"prompt_ids": prompt, "last_logits": [round(v, 6) for v in last], **golden}, fh, indent=1)


def kquants():
    """Random blocks with sane f16 scales, dequantised by gguf-py (ggml's reference in numpy)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    rng = np.random.default_rng(7)
    out = []
    layout = {  # type: (block bytes, byte offsets of f16 scales)
        T.Q4_0: (18, [0]), T.Q4_1: (20, [0, 2]), T.Q8_0: (34, [0]),
        T.Q4_K: (144, [0, 2]), T.Q5_K: (176, [0, 2]), T.Q6_K: (210, [208]),
        T.Q5_0: (22, [0]), T.Q5_1: (24, [0, 2]), T.Q2_K: (84, [80, 82]), T.Q3_K: (110, [108]),
        T.IQ4_NL: (18, [0]), T.IQ4_XS: (136, [0]),
    }
    for ty, (bb, scale_offsets) in layout.items():
        n_blocks = 3
        raw = bytearray(rng.integers(0, 256, size=bb * n_blocks, dtype=np.uint8).tobytes())
        for b in range(n_blocks):
            for off in scale_offsets:
                raw[b * bb + off: b * bb + off + 2] = np.float16(rng.uniform(0.01, 0.5)).tobytes()
        vals = dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), ty).astype(np.float32)
        out.append({"type": ty.name, "type_id": int(ty), "bytes_hex": bytes(raw).hex(),
                    "values": [float(v) for v in vals.ravel()]})
    with open(os.path.join(FIX, "kquants.json"), "w") as fh:
        json.dump(out, fh)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--qwen", help="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf: writes only its fixture")
    args = ap.parse_args()
    os.makedirs(FIX, exist_ok=True)
    if args.qwen:
        qwen_coder(args.qwen)
        return
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kquants()
    common = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257)
    tiny("tiny_llama", LlamaConfig, LlamaForCausalLM, torch.float32, tie_word_embeddings=False,
         rope_theta=10000.0,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
         **common)
    tiny("tiny_qwen2", Qwen2Config, Qwen2ForCausalLM, torch.bfloat16, tie_word_embeddings=True,
         rope_theta=1000000.0, **common)
    if not args.skip_smollm:
        smollm2(args.gguf)


if __name__ == "__main__":
    main()
