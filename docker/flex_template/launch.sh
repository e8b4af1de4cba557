#!/usr/bin/env bash
# Build and run the beam-influence Dataflow Flex Template (see docs/runners.md).
#
#   export PROJECT=my-project REGION=us-central1 BUCKET=my-bucket REPO=beam-influence   # Artifact Registry repo
#   bash docker/flex_template/launch.sh build            # CPU worker image + template spec
#   VARIANT=cuda bash docker/flex_template/launch.sh build
#   bash docker/flex_template/launch.sh run index \
#       spec=beam_influence.models.digits:logreg checkpoint=gs://$BUCKET/m/ckpt.msgpack \
#       eigensystem=gs://$BUCKET/m/eig.safetensors train_data='gs://$BUCKET/data/train-*.parquet' \
#       index_dir=gs://$BUCKET/index
#   VARIANT=cuda bash docker/flex_template/launch.sh run index ...   # L4 GPU workers, one SDK process per VM
#
# Run from the repository root (the Docker build context). Needs docker, gcloud (authenticated) and
# `gcloud auth configure-docker $REGION-docker.pkg.dev`. Not run in CI: no Docker engine or GCP there.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
REPO="${REPO:-beam-influence}"
VARIANT="${VARIANT:-cpu}"                       # cpu | cuda
TAG="${TAG:-0.1.0}"
REGISTRY="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}"
WORKER_IMAGE="${REGISTRY}/beam-influence-worker-${VARIANT}:${TAG}"
FLEX_IMAGE="${REGISTRY}/beam-influence-flex-${VARIANT}:${TAG}"
TEMPLATE="gs://${BUCKET}/templates/beam-influence-${VARIANT}.json"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPU_MACHINE="${GPU_MACHINE:-g2-standard-8}"
MAX_WORKERS="${MAX_WORKERS:-10}"

case "${VARIANT}" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 2 ;; esac

build() {
  docker build -f "docker/Dockerfile.${VARIANT}" -t "${WORKER_IMAGE}" .
  docker build -f docker/flex_template/Dockerfile.flex --build-arg "WORKER_IMAGE=${WORKER_IMAGE}" -t "${FLEX_IMAGE}" .
  docker push "${WORKER_IMAGE}"
  docker push "${FLEX_IMAGE}"
  gcloud dataflow flex-template build "${TEMPLATE}" \
    --project "${PROJECT}" \
    --image "${FLEX_IMAGE}" \
    --sdk-language PYTHON \
    --metadata-file docker/flex_template/metadata.json
  echo "template spec: ${TEMPLATE}"
}

run() {
  local job="${1:?usage: launch.sh run index|query|self-influence|run KEY=VALUE ...}"
  shift
  # '~' separates parameters (gcloud's ^~^ escaping) so values may contain ',' and ';'.
  local params="^~^job=${job}~sdk_container_image=${FLEX_IMAGE}"
  local kv
  for kv in "$@"; do params+="~${kv}"; done
  local extra=()
  if [[ "${VARIANT}" == cuda ]]; then
    params+="~dataflow_service_options=worker_accelerator=type:${GPU_TYPE};count:1;install-nvidia-driver"
    # One SDK process per VM so a single JAX process owns the GPU.
    extra+=(--worker-machine-type "${GPU_MACHINE}" --additional-experiments "use_runner_v2,no_use_multiple_sdk_containers")
  else
    extra+=(--additional-experiments use_runner_v2)
  fi
  gcloud dataflow flex-template run "beam-influence-${job}-$(date -u +%Y%m%d-%H%M%S)" \
    --project "${PROJECT}" \
    --region "${REGION}" \
    --template-file-gcs-location "${TEMPLATE}" \
    --temp-location "gs://${BUCKET}/tmp" \
    --staging-location "gs://${BUCKET}/staging" \
    --max-workers "${MAX_WORKERS}" \
    "${extra[@]}" \
    --parameters "${params}"
}

cmd="${1:-}"
shift || true
case "${cmd}" in
  build) build ;;
  run) run "$@" ;;
  *) echo "usage: $0 build | run JOB [KEY=VALUE ...]   (env: PROJECT REGION BUCKET [REPO VARIANT TAG])" >&2; exit 2 ;;
esac
