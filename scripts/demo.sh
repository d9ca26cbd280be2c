#!/usr/bin/env bash
# Install (pinned torch first), then the main job on the embedded default:
# meta-train both generators on multimodal 1-D regression for a few minutes, train MAML's
# fixed network for the same time, score both on the same test tasks, then generate a
# network for a new task and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
# The demo's networks are tiny: one intra-op thread is faster, and immune to oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
M=.venv/bin/metanet
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-1500}
mkdir -p "$(dirname "$RUN")"  # the folder of the result lines written beside the run

echo "== ready search spaces"
$M spaces list

echo "== meta-training metanet on multimodal regression ($STEPS steps) -> $RUN"
$M train --space mlp_regression --tasks multimodal --steps "$STEPS" --val-every 200 --hard \
  --strategy vmap --out "$RUN" --overwrite | tee "$RUN.train.json"
SECONDS_USED=$(.venv/bin/python -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['elapsed'])" "$RUN.train.json")

echo "== the baseline: MAML's fixed 1-40-40-1 network, trained for the same ${SECONDS_USED%.*} s -> $RUN-maml"
$M train --space mlp_maml --tasks multimodal --arch fixed --weights off \
  --minutes "$(.venv/bin/python -c "print($SECONDS_USED / 60)")" --val-every 100000 \
  --strategy vmap --out "$RUN-maml" --overwrite > /dev/null

echo "== both on the same 200 fixed test tasks (MSE on 100 query points after 10 inner steps)"
$M evaluate "$RUN" --episodes 200 --queries 100 > "$RUN.eval.json"
$M evaluate "$RUN-maml" --episodes 200 --queries 100 > "$RUN-maml.eval.json"
.venv/bin/python - "$RUN.eval.json" "$RUN-maml.eval.json" <<'PY'
import json, sys
ours, base = (json.load(open(p)) for p in sys.argv[1:])
def line(r):  # a diverged task (non-finite MSE) leaves the mean null
    return f"MSE {r['mse']:.3f} +- {r['ci95']:.3f}" if r["mse"] is not None else f"diverged on {r['nonfinite']} of {r['episodes']} tasks"
print(f"metanet (an architecture and weights generated per task): {line(ours)}")
print(f"MAML (one fixed network for all tasks), same time:        {line(base)}")
if ours["mse"] is None or base["mse"] is None:
    print("no comparison: " + " and ".join(n for n, r in (("metanet", ours), ("MAML", base)) if r["mse"] is None) + " diverged on some tasks")
else:
    apart = abs(ours["mse"] - base["mse"]) > ours["ci95"] + base["ci95"]
    better = "metanet" if ours["mse"] < base["mse"] else "MAML"
    print(f"lower is better: {better} is {'ahead (the 95% intervals do not overlap)' if apart else 'ahead, but within the 95% intervals'}")
PY

echo "== a new task: 5 points of a tanh-family function"
.venv/bin/python - "$RUN/new_task.npz" <<'PY'
import sys, numpy as np, torch
from metanet.tasks import FAMILY_NAMES, Multimodal
ep = Multimodal(shots=5, queries=1, families=("tanh",)).sample(1, torch.Generator().manual_seed(7))
np.savez(sys.argv[1], x=ep.support_x[0].numpy(), y=ep.support_y[0].numpy())
print("support x:", ep.support_x[0, :, 0].numpy().round(2), " y:", ep.support_y[0, :, 0].numpy().round(2))
PY

echo "== generate its network (architecture + weights + nn.Module + torch.export program)"
$M generate "$RUN" --support "$RUN/new_task.npz" --metadata tanh --adapt-steps 10 --out "$RUN/network" --overwrite

echo "== inspect it"
$M inspect "$RUN/network/genotype.json" --format text
$M inspect "$RUN" --support "$RUN/new_task.npz" --metadata tanh --soft --format text
echo "graph files: $(ls "$RUN/network" | tr '\n' ' ')"
