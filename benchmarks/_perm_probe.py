import numpy as np, math, sys
from embedkit.eval import bootstrap as B
from embedkit.eval import metrics as M
def perm_p(y, sa, sb, n_perm, rng):
    # rank-normalise each model per label, then swap per image
    from scipy.stats import rankdata
    ra = rankdata(sa, axis=0) / len(sa); rb = rankdata(sb, axis=0) / len(sb)
    obs = M.macro_auroc(y, None, ra) - M.macro_auroc(y, None, rb)
    flips = rng.random((n_perm, len(y))) < 0.5
    cnt = 0
    for f in flips:
        pa = np.where(f[:, None], rb, ra); pb = np.where(f[:, None], ra, rb)
        d = M.macro_auroc(y, None, pa) - M.macro_auroc(y, None, pb)
        cnt += abs(d) >= abs(obs) - 1e-12
    return (1 + cnt) / (n_perm + 1)
def run(n, prev, eff, sims):
    rng = np.random.default_rng(1)
    rej_p = rej_b = 0
    for s in range(sims):
        while True:
            y = (rng.random((n, len(prev))) < prev).astype(float)
            if (y.sum(0) > 0).all(): break
        c = rng.normal(size=y.shape)
        sa = y*np.asarray(eff) + math.sqrt(.5)*c + math.sqrt(.5)*rng.normal(size=y.shape)
        sb = y*np.asarray(eff) + math.sqrt(.5)*c + math.sqrt(.5)*rng.normal(size=y.shape)
        rej_p += perm_p(y, sa, sb, 500, rng) < 0.05
        idx = B.bootstrap_indices(n, 1000, s, targets=y)
        rej_b += B.paired_bootstrap_test(y, None, sa, sb, idx).p_value < 0.05
    print(n, prev, "perm", rej_p/sims, "boot", rej_b/sims)
run(150, (0.3,0.2,0.1,0.015), (1,.8,.6,.5), int(sys.argv[1]))
run(400, (0.3,0.2,0.1,0.05), (1,.8,.6,.5), int(sys.argv[1]))
