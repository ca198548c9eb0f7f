#!/bin/bash
# go.sh NAME args... ; runs in background
name=$1; shift
models=${12:-transformer}
python3 /tmp/h19/mk.py $name "$@" >/dev/null
rm -rf /tmp/h19/out/$name; mkdir -p /tmp/h19/out
( s=$(date +%s.%N); /usr/bin/time -f "%e wall %U user %S sys" nice -n 10 /tmp/h19/altformers compare --threads 1 --preset /tmp/h19/runs/$name.toml --parts mqar --models $models --out /tmp/h19/out/$name > /tmp/h19/runs/$name.log 2>&1 ) 
