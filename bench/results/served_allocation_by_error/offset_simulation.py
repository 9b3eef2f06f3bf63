"""Ad hoc: served tiers simulated on fake-quantized fp32 tables, with and without a per-table offset."""
import copy, json, sys, statistics as st, math
from pathlib import Path
import torch
sys.path.insert(0, "/work/main/bench")
from frontier import FP32Model
from shark_torchrec.jobs import export as ex
from shark_torchrec.precision.priority import INT1, INT4S, INT2S, SYMMETRIC_BITS, FP32, FP16, INT_BITS
from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, sign_magnitude_rows, symmetric_rows, symmetric_values, dequantize_rows

def decoded(x, g):
    if g == INT1:
        c, m = sign_magnitude_rows(x); return (c.float() * 2 - 1) * ONE_BIT_MAGNITUDES[m.long()].float()
    if g in SYMMETRIC_BITS:
        c, s = symmetric_rows(x, SYMMETRIC_BITS[g]); return symmetric_values(c, s, SYMMETRIC_BITS[g])
    if g == FP32: return x
    if g == FP16: return x.half().float()
    c, sb = ex._integer_rows(x, g, "fitted"); return dequantize_rows(c, sb)

runs = Path(sys.argv[1]); tiers = tuple(sys.argv[2].split(",")); budget = float(sys.argv[3]); seeds = int(sys.argv[4])
variants = sys.argv[5].split(",")
out = {v: [] for v in variants}
for s in range(seeds):
    fp = FP32Model(runs / f"fp32-s{s}")
    counts = ex.counted_priorities(fp.model, fp.data, progress=False)
    trained = fp.ebc
    serving = ex.ServingTiers(tiers, budget, "model", "fitted")
    policy, _ = ex._ranking_policy(trained)
    configs, dim, value, score = ex._rows_and_scores(trained, counts)
    groups = ex._one_bit_groups(serving, policy, configs, score)
    base = 0
    for v in variants:
        ebc = copy.deepcopy(trained)
        sd = ebc.state_dict()
        at = 0
        for c in configs:
            w = sd[f"embedding_bags.{c.name}.weight"]
            x = w.float().clone()
            gr = groups[at: at + c.num_embeddings]
            at += c.num_embeddings
            if v == "none":
                mu = torch.zeros(1, x.shape[1])
            elif v == "mean":
                mu = x.mean(0, keepdim=True)
            elif v == "wmean":
                cn = counts[c.name].float()[:, None]
                mu = (x * cn).sum(0, keepdim=True) / cn.sum().clamp_min(1e-9)
            elif v == "int1mean":
                sel = gr == INT1
                mu = x[sel].mean(0, keepdim=True) if sel.any() else torch.zeros(1, x.shape[1])
            elif v == "int1median":
                sel = gr == INT1
                mu = x[sel].median(0, keepdim=True).values if sel.any() else torch.zeros(1, x.shape[1])
            new = x.clone()
            for g in torch.unique(gr).tolist():
                k = (gr == g).nonzero().flatten()
                off = mu if (g in (INT1, INT4S, INT2S)) else 0.0
                new[k] = decoded(x[k] - off, g) + off
            w.copy_(new)
        m = fp.evaluate(ebc)
        out[v].append(m["auc"])
    print(s, {v: round(out[v][-1], 6) for v in variants}, flush=True)
json.dump(out, open(f"/tmp/w/sim_{sys.argv[2].replace(',','_')}_{budget}.json", "w"))
for v in variants[1:]:
    d = [a - b for a, b in zip(out[v], out[variants[0]])]
    print(f"{v} - {variants[0]}: {st.mean(d):+.5f} (SE {st.stdev(d)/math.sqrt(len(d)):.5f}) n {len(d)}")
