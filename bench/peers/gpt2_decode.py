"""Issue 28's Transformer peer: `transformers`' GPT-2 (`GPT2LMHeadModel`, SDPA attention)
decoding with its KV cache, as its users run it, at our decode benchmark's shape (12 layers of
width 768, 12 heads, bytes: vocabulary 256), batch 1.

For each context: prefill `context` random tokens with `use_cache=True`, then `--tokens` steps
of `model(token, past_key_values=cache)` with greedy sampling on the GPU (`argmax(...).item()`,
the one host sync per token any generation loop has), after 10 untimed steps. Prints one JSON
line per (dtype, context): median and mean milliseconds per token.

    python3 gpt2_decode.py [--contexts 1024,8192] [--dtypes float32,bfloat16] [--tokens 200]
"""
import argparse
import json
import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    contexts = [int(c) for c in args.contexts.split(",")]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        config = GPT2Config(vocab_size=256, n_positions=max(contexts) + args.tokens + 16, n_embd=args.width,
                            n_layer=args.depth, n_head=args.heads, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).to(args.device, dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        for context in contexts:
            prompt = torch.randint(0, 256, (1, context), device=args.device)
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                out = model(prompt, use_cache=True)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                prefill_s = time.perf_counter() - t0
                times = []
                for i in range(10 + args.tokens):
                    t = time.perf_counter()
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    token.item()  # the host sync of every sampling loop
                    if i >= 10:
                        times.append(time.perf_counter() - t)
            print(json.dumps({
                "peer": "transformers GPT2LMHeadModel (sdpa, DynamicCache)", "transformers": transformers.__version__,
                "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "dtype": dtype_name,
                "context": context, "batch": 1, "params": params,
                "ms_per_token_median": 1e3 * statistics.median(times),
                "ms_per_token_mean": 1e3 * sum(times) / len(times), "prefill_s": prefill_s,
            }), flush=True)
        del model


if __name__ == "__main__":
    main()
