#!/usr/bin/env bash
# Every row of the control ladder, one run directory per (row, seed), skipping runs already done:
#
#   bash scripts/ladder.sh CONFIG OUT_DIR [SEEDS] [extra overrides...]       SEEDS: "0" (default) or "0,1,2"
#
# Rows (one override apart from CONFIG): text CoT (none, insert), no-CoT (none, replace), pause (pause,
# replace), latent (latent, replace), latent two-trunk; the levers latent_soft and latent_gated on request.
# Every row shares CONFIG's curriculum and data. Environment:
#   LADDER_PLACEMENT=replace            how the rows other than CoT remove the written step: `replace` (its
#                                       expression) or `step` (its whole line; the graph task needs this)
#   LADDER_ROWS="cot nocot pause latent latent_two"   which rows (any of the names above)
#   LADDER_PHASE2_ROWS="latent pause"   rows run as `rlatent train` (phase 1, then phase 2 at the same budget)
#   LADDER_PHASE2="grpo.steps=40 ..."   overrides for phase 2 (default: none)
#   LADDER_JOBS=1                       runs at once (on a GPU, several small runs share it well)
#   LADDER_TIMEOUT=0                    seconds before a run is stopped (0: never); a stopped run can be
#                                       continued with `rlatent <cmd> --resume OUT_DIR/<row>-seed<s>`
# `python scripts/ladder_table.py OUT_DIR` then writes the table (Wilson intervals, paired McNemar tests).
set -euo pipefail
config="$1"; out="$2"; seeds="${3:-0}"; shift $(( $# < 3 ? $# : 3 ))
removed="latent.placement=${LADDER_PLACEMENT:-replace}"
declare -A rows=(
  [cot]="latent.mode=none latent.placement=insert"
  [nocot]="latent.mode=none $removed"
  [pause]="latent.mode=pause $removed"
  [latent]="latent.mode=latent $removed"
  [latent_two]="latent.mode=latent $removed latent.trunk=two"
  [latent_soft]="latent.mode=latent $removed latent.proj=soft"
  [latent_gated]="latent.mode=latent $removed latent.proj=gated"
)
phase2_rows=" ${LADDER_PHASE2_ROWS:-} "
jobs="${LADDER_JOBS:-1}"
limit="${LADDER_TIMEOUT:-0}"
mkdir -p "$out"

run_one() {  # row seed extra...
  local row="$1" seed="$2"; shift 2
  local name="$row-seed$seed" command=sft phase2=()
  if [[ "$phase2_rows" == *" $row "* ]]; then
    command=train
    # shellcheck disable=SC2206
    phase2=(${LADDER_PHASE2:-})
  fi
  if [ -f "$out/$name/report.md" ]; then echo "$name: done"; return; fi
  rm -rf "${out:?}/$name"
  local start=$SECONDS
  # shellcheck disable=SC2086
  if timeout "$limit" rlatent "$command" "$config" ${rows[$row]} "seed=$seed" "output.dir=$out" "output.name=$name" \
      "${phase2[@]}" "$@" >"$out/$name.log" 2>&1; then
    echo "$name: done in $((SECONDS - start)) s"
  else
    echo "$name: FAILED or stopped after $((SECONDS - start)) s (see $out/$name.log)"
  fi
}

for row in ${LADDER_ROWS:-cot nocot pause latent latent_two}; do
  [ -n "${rows[$row]:-}" ] || { echo "ladder.sh: unknown row '$row' (rows: ${!rows[*]})" >&2; exit 2; }
done
for seed in ${seeds//,/ }; do
  for row in ${LADDER_ROWS:-cot nocot pause latent latent_two}; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    run_one "$row" "$seed" "$@" &
  done
done
wait
