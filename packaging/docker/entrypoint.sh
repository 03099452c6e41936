#!/bin/sh
# The container's entrypoint: `hearth serve` on every address of the container, with the
# model, port and API key taken from the environment; arguments given to the container
# (docker run IMAGE ARGS, compose's command, Kubernetes' args) are added after them, so they
# win (e.g. --model another/repo --max-model-len 8192).
#
#   HEARTH_MODEL         the model (default: the bundled default model)
#   HEARTH_PORT          the port (default 8000; the healthcheck reads it too)
#   HEARTH_HOST          the address (default 0.0.0.0; :: for IPv6 as well)
#   HEARTH_API_KEY_FILE  a file holding the API key (default /run/secrets/hearth_api_key,
#                        where compose and Kubernetes mount secrets)
#   HEARTH_API_KEY       the API key itself, when there is no such file
#
# Listening beyond localhost needs an API key (`hearth serve` refuses otherwise), so one of
# the last two is required.
set -eu

key_file=${HEARTH_API_KEY_FILE:-/run/secrets/hearth_api_key}
if [ -s "$key_file" ]; then  # empty: no key was given
    set -- --api-key-file "$key_file" "$@"
elif [ -n "${HEARTH_API_KEY:-}" ]; then
    set -- --api-key "$HEARTH_API_KEY" "$@"
else
    echo "hearth-entrypoint: no API key. The server listens on the container's network, so it needs one:" \
         "set HEARTH_API_KEY, or mount a file holding it at $key_file (or name the file in HEARTH_API_KEY_FILE)." >&2
    exit 2
fi

exec hearth serve --host "${HEARTH_HOST:-0.0.0.0}" --port "${HEARTH_PORT:-8000}" \
    --model "${HEARTH_MODEL:-default}" "$@"
