#!/usr/bin/env bash
# Runs an icl_ft config on a Cloud TPU pod slice: create the slice, install, start the same command on
# every worker (JAX initialises multi-host from the TPU environment), copy results back, delete the slice.
#
#   launch/tpu_pod.sh --name icl-ft --zone us-central2-b --type v4-32 --config configs/paper.py:qwen1.5-7b \
#       [--project P] [--workdir gs://bucket/icl_ft/run1] [--keep] [--dry-run] [-- --config.icl.n=50 ...]
#   launch/tpu_pod.sh --name icl-ft --zone us-central2-b --type v4-32 --grid configs/grid.py [...]
#
# --grid runs a grid's cells one after another on the one slice (python -m icl_ft.grid), then aggregates them;
# size it first with `python -m icl_ft.grid --config=configs/grid.py --dry_run --slice=v4-32`.
# The work directory must be shared by all workers (a gs:// bucket path, used directly, or NFS): Orbax writes
# checkpoints from every host; results files are written by process 0. --dry-run prints the
# gcloud commands instead of running them. --keep leaves the slice running.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

NAME="" ZONE="" TYPE="" CONFIG="" GRID="" PROJECT="" WORKDIR="" KEEP=0 DRY=0
VERSION="tpu-ubuntu2204-base"
REPO_URL="${ICL_FT_REPO:-$(git -C "$(dirname "$0")/.." config --get remote.origin.url 2>/dev/null || true)}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --grid) GRID="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --repo) REPO_URL="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
for v in NAME ZONE TYPE; do
  if [[ -z "${!v}" ]]; then echo "missing --${v,,}" >&2; usage; fi
done
if [[ -z "$CONFIG" && -z "$GRID" || -n "$CONFIG" && -n "$GRID" ]]; then echo "pass one of --config and --grid" >&2; usage; fi
if [[ -z "$REPO_URL" ]]; then echo "no git remote to install from: pass --repo URL (or set ICL_FT_REPO)" >&2; exit 2; fi

run() { if [[ $DRY -eq 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

ARGS="--config=${GRID:-$CONFIG}"
[[ -n "$WORKDIR" ]] && ARGS+=" --config.workdir=$WORKDIR"
for a in "${EXTRA[@]}"; do ARGS+=" $(printf '%q' "$a")"; done
INSTALL="set -e; [ -d icl_ft ] || git clone $REPO_URL icl_ft; cd icl_ft && git pull -q; python3 -m venv .venv; \
.venv/bin/pip install -q -r requirements-cloud.txt 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
START="cd icl_ft && .venv/bin/python -m icl_ft.$([[ -n "$GRID" ]] && echo grid || echo main) $ARGS"

# Results written to a bucket are already safe; a local work directory lives on worker 0's disk and is copied
# back (the config's default work directory is under icl_ft/work) before the slice is deleted, also when the
# run failed or was preempted, so partial results survive.
copy_back() {
  case "$WORKDIR" in
    *://*) echo "results are in $WORKDIR (nothing to copy back)" >&2 ;;
    "") run "${GC[@]}" scp --recurse "$NAME:icl_ft/work" "./work-$NAME" "${WHERE[@]}" --worker=0 ;;
    /*|"~"*) run "${GC[@]}" scp --recurse "$NAME:$WORKDIR" "./$(basename "$WORKDIR")-$NAME" "${WHERE[@]}" --worker=0 ;;
    *) run "${GC[@]}" scp --recurse "$NAME:icl_ft/$WORKDIR" "./$(basename "$WORKDIR")-$NAME" "${WHERE[@]}" --worker=0 ;;
  esac
}
STARTED=0
cleanup() {
  if [[ $STARTED -eq 1 ]]; then copy_back || echo "copying the results back failed" >&2; fi
  if [[ $KEEP -eq 0 ]]; then run "${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet; fi
}
run "${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION"
trap cleanup EXIT
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$INSTALL"
STARTED=1
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$START"
