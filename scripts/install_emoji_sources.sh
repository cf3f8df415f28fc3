#!/usr/bin/env bash
# Install the emoji benchmark's sources; idempotent (does nothing when all are present).
#   - Debian packages (apt-get, as root or via sudo): fonts-noto-color-emoji, unicode-data,
#     unicode-cldr-core (and libfribidi0 / libcairo2 when missing)
#   - held-out artwork: `npm pack @twemoji/svg@15.0.0` and `npm pack openmoji@17.0.0`,
#     unpacked (SVGs and licence only) into .cache/emoji-sources/
# The work is done by scripts/fetch_emoji_sources.py, which needs only the standard library,
# so this works before the venv exists. The library itself only finds installed sources.
# Env: PYTHON (default: .venv/bin/python if present, else python3), HOLICLIP_EMOJI_SOURCES.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
exec "$PY" scripts/fetch_emoji_sources.py \
    --cache-dir "${HOLICLIP_EMOJI_SOURCES:-.cache/emoji-sources}" "$@"
