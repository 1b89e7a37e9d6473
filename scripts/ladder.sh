#!/usr/bin/env bash
# Phase 1 of every row of the control ladder, one run directory per row, skipping rows already done:
#
#   bash scripts/ladder.sh CONFIG OUT_DIR [SEED] [extra overrides...]
#
# Rows (one override apart from CONFIG): text CoT (none, insert), no-CoT (none, replace), pause (pause,
# replace), latent (latent, replace), latent two-trunk. Every row shares CONFIG's curriculum and data.
# `python scripts/ladder_table.py OUT_DIR` then writes the table (Wilson intervals, paired McNemar tests).
set -euo pipefail
config="$1"; out="$2"; seed="${3:-0}"; shift $(( $# < 3 ? $# : 3 ))
declare -A rows=(
  [cot]="latent.mode=none latent.placement=insert"
  [nocot]="latent.mode=none latent.placement=replace"
  [pause]="latent.mode=pause latent.placement=replace"
  [latent]="latent.mode=latent latent.placement=replace"
  [latent_two]="latent.mode=latent latent.placement=replace latent.trunk=two"
)
mkdir -p "$out"
for row in cot nocot pause latent latent_two; do
  name="$row-seed$seed"
  if [ -f "$out/$name/report.md" ]; then echo "$name: done"; continue; fi
  rm -rf "${out:?}/$name"
  start=$SECONDS
  # shellcheck disable=SC2086
  rlatent sft "$config" ${rows[$row]} "seed=$seed" "output.dir=$out" "output.name=$name" "$@" >"$out/$name.log" 2>&1 \
    && echo "$name: done in $((SECONDS - start)) s" || echo "$name: FAILED (see $out/$name.log)"
done
