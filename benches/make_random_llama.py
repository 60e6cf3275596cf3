"""A random-weight Llama-family model of a named shape, as an HF folder codelsi and transformers
both load: `config.json`, bf16 `model*.safetensors`, and the SmolLM2 tokenizer from the test
fixtures (so the vocabulary is at least its 49152 tokens). Only the shape matters to a speed or
memory benchmark, so no model has to be fetched (the GPU machines reach no hub).

    python3 benches/make_random_llama.py --shape 7b --out /tmp/random-7b

Shapes: `1.5b` (Qwen2.5-Coder-1.5B: hidden 1536, 28 layers, GQA 12/2), `7b` and `13b`
(Code Llama 7B / 13B: hidden 4096 / 5120, 32 / 40 layers, MHA; vocabulary 49152 instead of
32016, for the tokenizer).
"""

import argparse
import os
import shutil

import torch

SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 rope_theta=1e6, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
               rope_theta=1e6, tie_word_embeddings=False),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, vocab_size=49152,
                rope_theta=1e6, tie_word_embeddings=False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out}: already there")
        return
    torch.manual_seed(args.seed)
    config = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPES[args.shape])
    # Initialised on the GPU when there is one (a 13B shape takes minutes on a CPU).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="4GB")
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "..", "tests", "fixtures", "smollm2_tokenizer.json"),
                os.path.join(args.out, "tokenizer.json"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random {args.shape} shape, {n / 1e9:.2f} B parameters, bf16")


if __name__ == "__main__":
    main()
