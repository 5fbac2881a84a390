#!/bin/bash
# Slurm TaskProlog (runs as the job's user before each task): point iosvc at the job's token.
#   slurm.conf:  TaskProlog=/etc/iosvc/task_prolog.sh
# Lines printed as "export NAME=value" are set in the task's environment by slurmd.
CONF=/etc/iosvc/slurm.env
[ -r "$CONF" ] && . "$CONF"
IOSVC_TOKEN_DIR=${IOSVC_TOKEN_DIR:-/run/iosvc/tokens}
token="$IOSVC_TOKEN_DIR/$SLURM_JOB_ID.token"
[ -r "$token" ] && echo "export IOSVC_TOKEN_FILE=$token"
exit 0
