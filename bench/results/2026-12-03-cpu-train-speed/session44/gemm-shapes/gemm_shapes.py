import time, numpy as np, torch
torch.set_num_threads(1)
shapes=[(768,128,384),(768,128,128),(768,128,512),(768,512,128),(128,768,384),(768,384,128),(768,128,256)]
def bench(f, reps=2000):
    for _ in range(50): f()
    t=time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter()-t)/reps
for m,k,n in shapes:
    a=np.random.rand(m,k).astype(np.float32); b=np.random.rand(k,n).astype(np.float32)
    ta,tb=torch.from_numpy(a),torch.from_numpy(b)
    out=np.empty((m,n),np.float32); tout=torch.empty(m,n)
    tn=bench(lambda: np.matmul(a,b,out=out)); tt=bench(lambda: torch.mm(ta,tb,out=tout))
    fl=2*m*k*n
    print(f"{m}x{k}x{n}: numpy/openblas {fl/tn/1e9:.1f} GFLOP/s, torch/mkl {fl/tt/1e9:.1f} GFLOP/s")
