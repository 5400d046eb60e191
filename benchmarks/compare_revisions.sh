#!/usr/bin/env bash
# Latency of this checkout against another revision, measured in the same run: bench_server.py (HTTP clicks) and
# bench_models.py (encoder, decoder), run alternately ROUNDS times on each, sharing this checkout's .venv.
#
#   bash benchmarks/compare_revisions.sh REV [ROUNDS]     e.g. bash benchmarks/compare_revisions.sh HEAD~1 2
#
# Prints each run's tables and writes JSON to $OUT (default /tmp/compare_revisions).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?a git revision to compare against}
rounds=${2:-2}
out=${OUT:-/tmp/compare_revisions}
other=$(mktemp -d)/other
git worktree add -f --detach "$other" "$rev" >/dev/null
ln -s "$PWD/.venv" "$other/.venv"
trap 'git worktree remove --force "$other"' EXIT
mkdir -p "$out"
for round in $(seq "$rounds"); do
  for side in other this; do
    dir=$PWD; [ "$side" = other ] && dir=$other
    echo "== round $round: $side ($(git -C "$dir" rev-parse --short HEAD))"
    (cd "$dir" && .venv/bin/python benchmarks/bench_server.py --clicks 30 --json "$out/server_${side}_$round.json")
    (cd "$dir" && .venv/bin/python benchmarks/bench_models.py --json "$out/models_${side}_$round.json")
  done
done
