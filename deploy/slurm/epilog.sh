#!/bin/bash
# Slurm Epilog (root, job end): the job's token goes with the job.
#   slurm.conf:  Epilog=/etc/iosvc/epilog.sh
CONF=/etc/iosvc/slurm.env
[ -r "$CONF" ] && . "$CONF"
rm -f "${IOSVC_TOKEN_DIR:-/run/iosvc/tokens}/${SLURM_JOB_ID:?}.token"
exit 0
