"""The rational approximation of erf in f32 that ops/activation.rs uses on the CPU (issue 29):
erf(x) ~ x P(x^2) / Q(x^2) on |x| <= 3.925 (beyond, erf rounds to +-1 in f32), P of degree 6
and Q of degree 5, fitted for relative error by reweighted linear least squares; prints the
coefficients and the worst error in ulps of the f32 evaluation over [-6, 6].
    python3 scripts/fit-erf.py        (needs numpy)"""
import numpy as np, math
X = 3.925
xs = np.concatenate([np.linspace(1e-4, X, 40000), X*(1-np.cos(np.linspace(0, np.pi/2, 20000)))])
xs = np.unique(xs[xs > 0])
f = np.array([math.erf(v) for v in xs])
t = xs*xs
def fit(np_, nq, iters=30):
    D = np.ones_like(xs)
    w = 1/np.abs(f)
    for it in range(iters):
        # x P(t) - f Q(t) = 0 with Q(0)=1 ; unknowns p0..p_np, q1..q_nq ; weight 1/(f*D)
        A = np.concatenate([np.stack([xs*t**i for i in range(np_+1)],1), np.stack([-f*t**j for j in range(1,nq+1)],1)],1)
        b = f.copy()
        W = (w/D)[:,None]
        # minimax-ish: reweight by current error (Lawson)
        sol, *_ = np.linalg.lstsq(A*W, b*W[:,0], rcond=None)
        p = sol[:np_+1]; q = np.concatenate([[1.0], sol[np_+1:]])
        D = sum(q[j]*t**j for j in range(nq+1))
        approx = xs*sum(p[i]*t**i for i in range(np_+1))/D
        err = (approx - f)/f
        w = w * (1 + 50*np.abs(err)/np.abs(err).max())  # Lawson-like emphasis
    return p, q, np.abs(err).max()
best=None
for np_, nq in [(5,4),(6,4),(6,5),(5,5),(7,4)]:
    p,q,e = fit(np_, nq)
    print(np_, nq, e)
    if best is None or e < best[2]: best=(p,q,e)
p,q,e = best
# float32 evaluation check
def erf32(x):
    x = np.float32(x)
    xc = np.clip(x, np.float32(-X), np.float32(X))
    t = xc*xc
    P = np.float32(p[-1])
    for c in p[-2::-1]: P = P*t + np.float32(c)
    Q = np.float32(q[-1])
    for c in q[-2::-1]: Q = Q*t + np.float32(c)
    return xc*P/Q
grid = np.linspace(-6, 6, 2000001).astype(np.float32)
ref = np.array([math.erf(float(v)) for v in grid[::1]])
got = erf32(grid).astype(np.float64)
ulp = np.abs(got-ref)/np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
ulp[ref==0]=0
print("max ulp", ulp.max(), "at", grid[np.argmax(ulp)], "mean", ulp.mean())
np.set_printoptions(precision=17)
print("p", repr(p)); print("q", repr(q))
