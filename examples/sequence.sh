#!/usr/bin/env bash
# The sequential workflow of the README, end to end on the embedded model: three batches of two facts
# (examples/facts.jsonl split in three), the history, reverting the middle batch, exporting the rest as a PEFT
# LoRA adapter and serving it with peft. Prints a transcript (each command after "$ ", then its output):
#
#     bash examples/sequence.sh OUT_DIR > benchmarks/results/sequence_walkthrough_cpu.txt
#
# Needs the statistics of `covedit build-stats --tokens 100000` and the extra `pip install 'covedit[serve]'`.
set -euo pipefail
out=${1:?usage: examples/sequence.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
covedit=${COVEDIT:-covedit}
rm -rf "$out" && mkdir -p "$out"
sed -n 1,2p "$here/facts.jsonl" > "$out/batch1.jsonl"
sed -n 3,4p "$here/facts.jsonl" > "$out/batch2.jsonl"
sed -n 5,6p "$here/facts.jsonl" > "$out/batch3.jsonl"

run() {  # print the command as a user types it (paths relative to OUT_DIR), then run it
  echo "\$ $*" | sed "s#$out/##g; s#^\\\$ $covedit#\$ covedit#"
  "$@" 2>&1 | grep -v '^INFO \|Loading weights\|FutureWarning\|warnings.warn' | sed "s#$out/##g"
  echo
}

cd "$out"
run $covedit batch-edit batch1.jsonl -o seq1
run $covedit batch-edit batch2.jsonl --base seq1 -o seq2
run $covedit batch-edit batch3.jsonl --base seq2 -o seq3
run $covedit history seq3
run $covedit revert seq3 --batch 2 -o seq3-without-2
run $covedit history seq3-without-2
run $covedit export seq3-without-2 --format peft -o adapter
run $covedit export seq3-without-2 --format peft --max-rank 2 -o adapter-rank2
cat > serve.py <<'PY'
from covedit.pipeline.export import load_adapter
from covedit.pipeline.models import load_model
base = load_model("smollm2-135m")                  # the original weights and tokenizer
model = load_adapter(base.model, "adapter")        # checks the base weights' hashes, then peft.PeftModel
ids = base.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
print(base.tokenizer.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0]))
PY
echo "\$ cat serve.py"; cat serve.py; echo
run ${PYTHON:-python} serve.py
echo "\$ du -sh adapter seq3-without-2/model.safetensors"
du -sh adapter seq3-without-2/*.safetensors | grep -v delta
