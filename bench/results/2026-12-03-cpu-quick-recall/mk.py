#!/usr/bin/env python3
# usage: mk.py NAME T P V steps batch lr heads_width(0=default 4 heads) position(learned|rope|-) wd warm curve_every [models]
import sys, re, subprocess, os
a = sys.argv[1:]
name, T, P, V, steps, batch, lr, hw, pos, wd, warm, ce = a[:12]
models = a[12] if len(a) > 12 else "transformer"
base = open('/work/main/configs/compare-quick.toml').read()
# cut [mqar] ... up to [listops]
pre, rest = base.split('[mqar]\n', 1)
post = rest[rest.index('# ListOps at a smoke budget'):]
m = f"""[mqar]
vocab = {V}
tasks = [[{T}, {P}]]
widths = [64]
depth = 2
steps = {steps}
batch_size = {batch}
lrs = [{lr}]
eval_examples = 512
curve_every = {ce}

[mqar.optimizer]
beta1 = 0.9
beta2 = 0.98
eps = 1e-8
weight_decay = {wd}
grad_clip = 1.0
warmup_fraction = {warm}
min_lr_fraction = 0.1

[mqar.head_width]
retnet = 256
"""
if hw != "0":
    m += f"transformer = {hw}\n"
if pos != "-":
    m += f'\n[mqar.per_model.transformer]\nposition = "{pos}"\n'
open(f'/tmp/h19/runs/{name}.toml','w').write(pre + m + "\n" + post)
print(f'/tmp/h19/runs/{name}.toml')
