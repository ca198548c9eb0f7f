"""Issue 26's check against `transformers` itself: checkpoints in both directions.

1. Import: a randomly initialised `GPT2LMHeadModel` and `RwkvForCausalLM` (small configs, every
   parameter then perturbed so that biases, norms and mixing ratios are all non-trivial) are
   saved with `save_pretrained` (safetensors), imported by `altformers import --format
   hf-gpt2|hf-rwkv4`, and compared on the same tokens: logits in f32 (max abs difference below
   1e-4, parallel and recurrent forms) and greedy text (`altformers generate --temperature 0`
   against an arg-max loop in PyTorch); the RWKV model also saved in 100 KB shards.
2. Export: our Transformer and RWKV-4, trained briefly on Tiny Shakespeare (or the runs given
   with --transformer-run / --rwkv4-run), written by `altformers export --format hf`, loaded
   with `from_pretrained`, and compared the same way.

Prints one JSON line per comparison and exits non-zero if any fails.

    python3 bench/peers/hf_roundtrip.py --altformers target/release/altformers --work /tmp/hf-roundtrip
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.numpy import load_file

TOLERANCE = 1e-4


def sh(args):
    result = subprocess.run(args, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed:\n{result.stderr.decode(errors='replace')}")
    return result.stdout


def ours_logits(binary, run, ids, mode, work):
    out = os.path.join(work, f"logits-{os.path.basename(run)}-{mode}.safetensors")
    sh([binary, "--threads", "1", "logits", "--run", run, "--ids", ",".join(map(str, ids)), "--out", out, "--mode", mode])
    return torch.from_numpy(load_file(out)["logits"])


def theirs_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def greedy_theirs(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return bytes(ids[len(prompt):])


def greedy_ours(binary, run, prompt, n):
    text = sh([binary, "--threads", "1", "generate", "--run", run, "--prompt", prompt.decode(), "--tokens", str(n),
               "--temperature", "0"])
    return text[len(prompt):-1]  # the prompt is printed first, a newline last


def compare(name, binary, run, model, ids, prompt, n, work):
    rows = []
    theirs = theirs_logits(model, ids)
    for mode in ["parallel", "recurrent"]:
        diff = (ours_logits(binary, run, ids, mode, work) - theirs).abs().max().item()
        rows.append({"check": name, "form": mode, "max_abs_diff": diff, "logit_scale": theirs.abs().max().item(),
                     "ok": diff < TOLERANCE})
    ours_text, their_text = greedy_ours(binary, run, prompt, n), greedy_theirs(model, prompt, n)
    rows.append({"check": name, "greedy_tokens": n, "same_text": ours_text == their_text,
                 "ours": ours_text.decode(errors="replace"), "theirs": their_text.decode(errors="replace"),
                 "ok": ours_text == their_text})
    for row in rows:
        print(json.dumps(row), flush=True)
    return all(r["ok"] for r in rows)


def perturb(model, seed, scale=0.2):
    """Every parameter moved by N(0, scale^2): biases, norm gains and mixing ratios away from
    their initial constants, so a mapping that drops or swaps one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--altformers", default="target/release/altformers")
    ap.add_argument("--work", default="/tmp/hf-roundtrip")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--transformer-run", help="a trained transformer run folder to export (default: train one)")
    ap.add_argument("--rwkv4-run", help="a trained rwkv4 run folder to export (default: train one)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--greedy", type=int, default=48)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel, RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    os.makedirs(args.work, exist_ok=True)
    b = args.altformers
    prompt = b"ROMEO:\nWhat say"
    ids = list(b"First Citizen:\nBefore we proceed any further, hear me speak.")
    ok = True

    # 1. transformers -> altformers
    gpt2 = perturb(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                              activation_function="gelu_new")).eval(), 1)
    rwkv = perturb(RwkvForCausalLM(RwkvConfig(vocab_size=256, context_length=128, hidden_size=64, num_hidden_layers=2,
                                              intermediate_size=224, rescale_every=0)).eval(), 2)
    for name, model, fmt, shard in [("import GPT2LMHeadModel", gpt2, "hf-gpt2", None),
                                    ("import RwkvForCausalLM", rwkv, "hf-rwkv4", None),
                                    ("import RwkvForCausalLM, 100KB shards", rwkv, "hf-rwkv4", "100KB")]:
        tag = f"{fmt}-{shard or 'one'}"
        hf_dir = os.path.join(args.work, f"{tag}-hf")
        run = os.path.join(args.work, f"{tag}-run")
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(hf_dir, safe_serialization=True, **kwargs)
        if shard:
            assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")), os.listdir(hf_dir)
        sh([b, "import", "--format", fmt, hf_dir, "--out", run])
        ok &= compare(name, b, run, model, ids, prompt, args.greedy, args.work)

    # 2. altformers -> transformers
    for arch, given, cls in [("transformer", args.transformer_run, GPT2LMHeadModel),
                             ("rwkv4", args.rwkv4_run, RwkvForCausalLM)]:
        run = given or os.path.join(args.work, f"{arch}-trained")
        if not given:
            sh([b, "--threads", "1", "train", "--model", arch, "--data", args.data, "--config", "configs/nanogpt-cpu.toml",
                "--set", f"train.steps={args.train_steps}", "--set", f"train.eval_every={args.train_steps}",
                "--set", "train.eval_batches=2", "--out", run, "--quiet"])
        hf_dir = os.path.join(args.work, f"{arch}-export")
        sh([b, "export", "--run", run, "--format", "hf", "--out", hf_dir])
        model = cls.from_pretrained(hf_dir).eval()
        ok &= compare(f"export {arch} as {cls.__name__}", b, run, model, ids, prompt, args.greedy, args.work)

    print(json.dumps({"all_ok": bool(ok), "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
