# Dataflow Flex Template launcher image: the worker image plus Google's Python template launcher, so
# one image serves as the template launcher *and* as the workers' --sdk_container_image.
#
#   docker build -f docker/Dockerfile.cpu -t "$WORKER_IMAGE" .
#   docker build -f docker/flex_template/Dockerfile.flex --build-arg WORKER_IMAGE="$WORKER_IMAGE" -t "$FLEX_IMAGE" .
#
# (docker/flex_template/launch.sh does both, pushes, and runs `gcloud dataflow flex-template build`.)
ARG WORKER_IMAGE=beam-influence-worker-cpu:0.1.0
FROM ${WORKER_IMAGE}

COPY --from=gcr.io/dataflow-templates-base/python311-template-launcher-base:flex_templates_base_image_release_20240628_RC00 /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher

COPY docker/flex_template/main.py /opt/beam-influence/flex_main.py
# Everything the job needs is installed in the image: no requirements/setup file for the launcher to stage.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/beam-influence/flex_main.py \
    XLA_PYTHON_CLIENT_PREALLOCATE=false

# Workers start the Beam SDK harness; the Flex Template service runs the launcher binary explicitly.
ENTRYPOINT ["/opt/apache/beam/boot"]
