#!/usr/bin/env bash
# Install (pinned torch first), then the main job on the embedded default:
# meta-train both generators on multimodal 1-D regression for a few minutes, evaluate,
# generate a network for a new task, and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
# The demo's networks are tiny: one intra-op thread is faster, and immune to oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
M=.venv/bin/metanet
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-600}

echo "== ready search spaces"
$M spaces list

echo "== meta-training on multimodal regression ($STEPS steps) -> $RUN"
$M train --space mlp_regression --tasks multimodal --steps "$STEPS" --val-every 200 --hard \
  --strategy vmap --out "$RUN" --overwrite

echo "== evaluation on 200 fixed test tasks (MSE after 10 inner steps)"
$M evaluate "$RUN" --episodes 200 --queries 100

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
cat "$RUN/network/summary.txt"

echo "== inspect it"
$M inspect "$RUN/network/genotype.json" --format text
$M inspect "$RUN" --support "$RUN/new_task.npz" --metadata tanh --soft --format text
echo "graph files: $(ls "$RUN/network" | tr '\n' ' ')"
