#!/usr/bin/env bash
# Install everything (scripts/install.sh), then run the main job on the embedded defaults:
# statistics for SmolLM2-135M's edit layers from 100,000 tokens of the embedded Wikipedia corpus (cached:
# a second run returns at once), then a MEMIT edit of the example facts, written to out/edited/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/covedit build-stats --tokens "${TOKENS:-100000}"
.venv/bin/covedit batch-edit examples/facts.jsonl --output out/edited --overwrite
