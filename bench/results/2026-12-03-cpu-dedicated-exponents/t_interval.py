# Issue 27, a what-if: the interval as a t interval over the per-process exponents
# (estimate +- t(0.975, n-1) s / sqrt(n)) instead of the cluster bootstrap, applied to the three
# quick runs at f3d1035 and the dedicated three-process runs. Run from bench/results/.
import json, math, sys, glob
T = {1:12.706,2:4.303,3:3.182,4:2.776,5:2.571,6:2.447,7:2.365,8:2.306,9:2.262}
def slope(pts):
    # upper half: as fit::upper_half_slope? approximate: least squares over the upper half of lengths
    pts=sorted(pts); n=len(pts); start=n//2 if n>2 else 0
    pts=pts[start:]
    xs=[math.log(a) for a,b in pts]; ys=[math.log(b) for a,b in pts]
    mx=sum(xs)/len(xs); my=sum(ys)/len(ys)
    return sum((x-mx)*(y-my) for x,y in zip(xs,ys))/sum((x-mx)**2 for x in xs)
def load(path):
    curves={}
    for l in open(path):
        r=json.loads(l)
        if r.get('status')!='ok' or 'process_samples_s' not in r: continue
        if r.get('component') not in ('mixer','model') : pass
        curves.setdefault((r['model'],r['component'],r['mode']),[]).append(r)
    out={}
    for k,c in curves.items():
        if any(len(p['process_samples_s'])<2 for p in c): continue
        g=len(c[0]['process_samples_s'])
        est=slope([(p['seq'],min(min(s) for s in p['process_samples_s'])/p['batch']) for p in c])
        per=[slope([(p['seq'],min(p['process_samples_s'][i])/p['batch']) for p in c]) for i in range(g)]
        m=sum(per)/g; s=math.sqrt(sum((x-m)**2 for x in per)/(g-1)); h=T[g-1]*s/math.sqrt(g)
        out[k]=(est,h,per)
    return out
runs=[load(f) for f in ['2026-12-03-cpu-quick-f3d1035/scaling.jsonl','2026-12-03-cpu-quick-f3d1035/run2-scaling.jsonl','2026-12-03-cpu-quick-f3d1035/run3-scaling.jsonl']]
ded={}
for f in glob.glob('2026-12-03-cpu-dedicated-exponents/dedicated-3-processes/points-*.jsonl'):
    ded.update(load(f))
inside=0; tot=0
for k in sorted(runs[0]):
    if k not in ded: continue
    e,h,per=ded[k]
    qs=[r[k][0] for r in runs if k in r]
    ins=[abs(q-e)<=h for q in qs]; inside+=sum(ins); tot+=len(ins)
    print(k[0],k[1],k[2], 'ded %.2f ±%.3f'%(e,h), 'quick', ' '.join('%.2f±%.3f'%(r[k][0],r[k][1]) for r in runs if k in r), ins)
print(inside,tot)
