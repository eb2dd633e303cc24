#!/bin/sh
# Entrypoint of the vggprice images. A worker forwards its store settings, credentials and
# CUDA_VISIBLE_DEVICES to a run as '{{ $NAME }}' placeholders, which Prefect fills with ''
# when the worker has no such variable: here an empty one means unset, so vggprice and
# boto3 fall back to their defaults (and every GPU stays visible).
for name in VGGPRICE_STORE VGGPRICE_S3_ENDPOINT_URL AWS_ENDPOINT_URL AWS_REGION \
  AWS_DEFAULT_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN \
  VGGPRICE_WORKER_NAME CUDA_VISIBLE_DEVICES; do
  eval "value=\${$name-unset}"
  [ -n "$value" ] || unset "$name"
done
unset value
exec "$@"
