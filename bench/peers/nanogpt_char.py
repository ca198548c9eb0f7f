"""Peer for issue 2's figure: nanoGPT's character-level Shakespeare run, re-implemented in
PyTorch (our own code, written from nanoGPT's description and model.py/train.py semantics),
so that its validation loss can be measured over many seeds beside ours instead of quoted.

What is kept from nanoGPT (the README's CPU command, config/train_shakespeare_char.py and
train.py's defaults): a 65-character vocabulary built from the text, the 90/10 split, GPT-2
blocks without biases (LayerNorm without bias too), tied input/output embeddings, N(0, 0.02)
initialisation with the residual projections at 0.02 / sqrt(2 n_layer), AdamW (betas 0.9 /
0.99, weight decay 0.1 on every parameter of two or more dimensions, embeddings included),
linear warm-up lr * (it + 1) / (warmup + 1) then cosine to min_lr, gradient clipping at 1.0,
random windows drawn from torch's global generator, and nanoGPT's evaluation (the mean of
eval_iters random batches per split, every eval_interval iterations, before that iteration's
update). f32 throughout (TF32 off), as on nanoGPT's CPU run.

Printed per seed, one JSON line: nanoGPT's own estimate at max_iters (eval_iters = 20, the
README's CPU setting, which is the "1.88"), the same estimate with 200 batches (a separate
generator, so training is untouched), and the loss over the whole validation split in
consecutive windows, every character after the first predicted once: exactly what
`altformers eval` computes.

    python3 nanogpt_char.py --data ../../data/tinyshakespeare.txt --seeds 1337,1338 [--device cuda]

nanoGPT's GPU "baby GPT" (config/train_shakespeare_char.py: bf16 autocast, compiled, dropout 0.2):

    python3 nanogpt_char.py --data ../../data/tinyshakespeare.txt --device cuda --bf16 --compile \
      --iters 5000 --eval-iters 200 --block-size 256 --batch-size 64 --n-layer 6 --n-head 6 \
      --n-embd 384 --dropout 0.2
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, n_head, dropout=0.0):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(c, bias=False)
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.attn_proj = nn.Linear(c, c, bias=False)
        self.ln_2 = nn.LayerNorm(c, bias=False)
        self.c_fc = nn.Linear(c, 4 * c, bias=False)
        self.mlp_proj = nn.Linear(4 * c, c, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab, block_size, n_layer, n_head, c, dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(block_size, c)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(c, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c, bias=False)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for blk in self.blocks:
            for p in (blk.attn_proj.weight, blk.mlp_proj.weight):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def run(seed, text, args):
    torch.manual_seed(seed)
    dev = args.device
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    T, B = args.block_size, args.batch_size

    def get_batch(split, gen=None):
        d = splits[split]
        ix = torch.randint(len(d) - T, (B,), generator=gen)
        x = torch.stack([d[i:i + T] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + T] for i in ix])
        return x.to(dev), y.to(dev)

    model = GPT(len(chars), T, args.n_layer, args.n_head, args.n_embd, args.dropout).to(dev)
    # nanoGPT's GPU recipe (config/train_shakespeare_char.py on a GPU): bf16 autocast for the
    # forward passes, the model compiled; the CPU run is f32 and eager
    forward = torch.compile(model) if args.compile else model
    amp = torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=args.bf16)

    def loss_of(x, y):
        with amp:
            return forward(x, y)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))

    def lr_at(it):
        if it < args.warmup:
            return args.lr * (it + 1) / (args.warmup + 1)
        if it > args.iters:
            return args.min_lr
        ratio = (it - args.warmup) / (args.iters - args.warmup)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)

    @torch.no_grad()
    def estimate(iters, gen=None):
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = sum(loss_of(*get_batch(split, gen)).item() for _ in range(iters)) / iters
        model.train()
        return out

    @torch.no_grad()
    def whole_val():
        model.eval()
        d = splits["val"]
        total, count = 0.0, 0
        starts = list(range(0, len(d) - 1, T))
        full = [s for s in starts if s + T < len(d)]
        groups = [full[i:i + 256] for i in range(0, len(full), 256)] + [[s for s in starts if s + T >= len(d)]]
        for g in groups:
            if not g:
                continue
            ln = min(T, len(d) - 1 - g[0])
            x = torch.stack([d[s:s + ln] for s in g]).to(dev)
            y = torch.stack([d[s + 1:s + 1 + ln] for s in g]).to(dev)
            total += loss_of(x, y).item() * len(g) * ln
            count += len(g) * ln
        return total / count

    start = time.time()
    x, y = get_batch("train")
    curve = []
    it = 0
    train_s = 0.0  # the training steps alone, evaluations left out (the speed benchmark's figure)
    while True:
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % args.eval_interval == 0:
            losses = estimate(args.eval_iters)
            curve.append({"iter": it, **losses})
        if it == args.iters:
            break
        step_start = time.time()
        loss = loss_of(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.time() - step_start
        it += 1
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {
        "peer": "nanogpt-char (PyTorch, our re-implementation)", "seed": seed, "iters": args.iters,
        "params": sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel(),
        "val_loss_nanogpt_20": curve[-1]["val"], "train_loss_nanogpt_20": curve[-1]["train"],
        "val_loss_200": estimate(200, gen)["val"], "val_loss_whole_split": whole_val(),
        "elapsed_s": time.time() - start, "train_s": train_s, "tokens_per_s": args.iters * B * T / train_s,
        "best_val_nanogpt": min(c["val"] for c in curve), "dropout": args.dropout, "bf16": args.bf16,
        "compile": args.compile, "threads": torch.get_num_threads(), "device": dev, "torch": torch.__version__, "curve": curve,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (nanoGPT's GPU default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (nanoGPT's GPU default)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    text = open(args.data, encoding="utf-8").read()
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(run(seed, text, args)), flush=True)


if __name__ == "__main__":
    main()
