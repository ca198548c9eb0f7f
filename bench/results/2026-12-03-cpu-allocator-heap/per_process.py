import json, math, sys, glob
T = {1:12.706,2:4.303,3:3.182,4:2.776,5:2.571,6:2.447,7:2.365,8:2.306,9:2.262}
def slope(pts):
    pts=sorted(pts); n=len(pts); start=n//2 if n>2 else 0
    pts=pts[start:]
    xs=[math.log(a) for a,b in pts]; ys=[math.log(b) for a,b in pts]
    mx=sum(xs)/len(xs); my=sum(ys)/len(ys)
    return sum((x-mx)*(y-my) for x,y in zip(xs,ys))/sum((x-mx)**2 for x in xs)
def load(path, reps=None):
    curves={}
    for l in open(path):
        r=json.loads(l)
        if r.get('status')!='ok' or 'process_samples_s' not in r: continue
        curves.setdefault((r['model'],r['component'],r['mode']),[]).append(r)
    out={}
    for k,c in curves.items():
        g=len(c[0]['process_samples_s'])
        ps=lambda p,i: p['process_samples_s'][i][:reps] if reps else p['process_samples_s'][i]
        est=slope([(p['seq'],min(min(ps(p,i)) for i in range(g))/p['batch']) for p in c])
        per=[slope([(p['seq'],min(ps(p,i))/p['batch']) for p in c]) for i in range(g)]
        m=sum(per)/g; s=math.sqrt(sum((x-m)**2 for x in per)/(g-1))
        out[k]=(est,s,per)
    return out
for f in sys.argv[1:]:
    for reps in (None,1):
        for k,(e,s,per) in load(f,reps).items():
            print(f.split('/')[-1], 'reps', reps or 'all', k[0], '%.3f sd %.3f'%(e,s), ' '.join('%.3f'%x for x in per))
