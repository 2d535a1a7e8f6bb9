#!/usr/bin/env bash
# Write cluster/scgpt.env, the run-time environment of the Ray launcher clusters (cluster/aws.yaml,
# cluster/gcp.yaml), from this shell's environment. The file holds the Ray auth token: it is git-ignored and
# written with mode 600. Re-run it (then `ray up` again) to change a value.
#
#   export MLFLOW_TRACKING_URI=https://mlflow.example.org   # MLflow server every run logs to
#   export SCGPT_CHECKPOINT_URI=s3://YOUR-BUCKET/scgpt     # or gs://...: durable copies of checkpoints
#   export SCGPT_SHARED_NFS=fs-0123.efs.us-west-2.amazonaws.com:/   # or <filestore-ip>:/<share>
#   cluster/make-env.sh                  # PYTHON=/path/to/python: the environment whose `ray` to use
set -euo pipefail

# The ray CLI: next to $PYTHON when given (no PATH assumption), else the one on PATH.
if [ -n "${PYTHON:-}" ]; then
    RAY="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')/ray"
else
    RAY=$(command -v ray || true)
fi
if [ -z "$RAY" ] || [ ! -x "$RAY" ]; then
    echo "error: no ray CLI found; pass PYTHON=/path/to/python of the environment ray is installed in" >&2
    exit 2
fi

missing=()
for name in MLFLOW_TRACKING_URI SCGPT_CHECKPOINT_URI SCGPT_SHARED_NFS; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
    echo "error: set ${missing[*]} in your environment first (see the top of $0)" >&2
    exit 2
fi
case "$SCGPT_CHECKPOINT_URI" in
    s3://* | gs://*) ;;
    *)
        echo "error: SCGPT_CHECKPOINT_URI must be an s3:// or gs:// URI, got $SCGPT_CHECKPOINT_URI" >&2
        exit 2
        ;;
esac

# The same token on every node and in this machine's ~/.ray/auth_token, which `ray job submit` reads.
token="$(RAY_AUTH_MODE=token "$RAY" get-auth-token --generate)"

out="$(dirname "$0")/scgpt.env"
umask 077
{
    echo "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    echo "SCGPT_CHECKPOINT_URI=$SCGPT_CHECKPOINT_URI"
    echo "SCGPT_SHARED_NFS=$SCGPT_SHARED_NFS"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN=$token"
} >"$out"
echo "wrote $out (mode 600; git-ignored)"
