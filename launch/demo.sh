#!/usr/bin/env bash
# The demo end to end: signing key, self-made corpus + tokenizer (kai-data), 2-rank CPU training
# with DeepSpeed under torchrun, bundle, offline verify. Run from the repo root with the venv active
# (`make demo` does both). RUN_DIR, NPROC and ZERO can be overridden from the environment.
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/demo}
NPROC=${NPROC:-2}
ZERO=${ZERO:-zero2}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

rm -rf "$RUN_DIR"
echo "== 1/5 signing key"
kai-attest keygen "$RUN_DIR/keys"
echo "== 2/5 data: demo corpus → ingest → dedup → sentencepiece tokenizer → packed Parquet shards"
kai-data out_dir="$RUN_DIR" run_id=demo executor.kind=local   # datatrove's local executor
echo "== 3/5 training: torchrun --nproc_per_node $NPROC, DeepSpeed $ZERO"
torchrun --nproc_per_node "$NPROC" -m kai_train.train run_dir="$RUN_DIR" run_id=demo deepspeed="$ZERO" "$@"
echo "== 4/5 bundle"
kai-attest bundle "$RUN_DIR"
echo "== 5/5 verify (offline; replays a segment drawn at random and the last one: a PASS recomputed them)"
kai-attest verify "$RUN_DIR/bundle" --trust "$RUN_DIR/keys/signing-key.pub.pem"
cat <<MSG

Done. Where everything is:
  $RUN_DIR/chain.jsonl         signed, hash-linked provenance chain (one Sigstore bundle per line)
  $RUN_DIR/data/shards/        packed training shards, manifests in data/shards/.manifests/
                               (data/ingest, data/dedup: earlier stages; work/: datatrove's task state)
  $RUN_DIR/tokenizer/          sentencepiece model
  $RUN_DIR/checkpoints/        signed state per checkpoint, one shard per rank (step-000000 = genesis);
                               resume and replay load these files
  $RUN_DIR/bundle/             what an evaluator receives; check it with:
                               kai-attest verify $RUN_DIR/bundle --trust $RUN_DIR/keys/signing-key.pub.pem
MSG
