#!/bin/bash
# Slurm Prolog (runs as root on each node at job start): mint this job's iosvc token.
#   slurm.conf:  Prolog=/etc/iosvc/prolog.sh   (and PrologFlags=Alloc to run it at allocation)
# The token carries the job id, user, group and node count Slurm gave; servers in secure mode
# take the identity from it alone. It is readable only by the job's user.
set -euo pipefail
CONF=/etc/iosvc/slurm.env          # IOSVC_BIN, IOSVC_KEY_FILE, IOSVC_TOKEN_DIR
[ -r "$CONF" ] && . "$CONF"
IOSVC_BIN=${IOSVC_BIN:-iosvc}
IOSVC_TOKEN_DIR=${IOSVC_TOKEN_DIR:-/run/iosvc/tokens}
: "${IOSVC_KEY_FILE:?set IOSVC_KEY_FILE in $CONF}"
: "${SLURM_JOB_ID:?not run by slurmd}" "${SLURM_JOB_USER:?}"
nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
nodes=${SLURM_JOB_NUM_NODES:-$(scontrol show hostnames "$nodelist" | wc -l)}
group=$(id -gn "$SLURM_JOB_USER")
mkdir -p -m 0711 "$IOSVC_TOKEN_DIR"
token="$IOSVC_TOKEN_DIR/$SLURM_JOB_ID.token"
umask 077
"$IOSVC_BIN" token issue --key-file "$IOSVC_KEY_FILE" --job "$SLURM_JOB_ID" \
    --user "$SLURM_JOB_USER" --group "$group" --nodes "$nodes" --ttl 7d > "$token.tmp"
chown "$SLURM_JOB_USER" "$token.tmp"
mv "$token.tmp" "$token"
