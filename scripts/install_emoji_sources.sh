#!/usr/bin/env bash
# Install the emoji benchmark's sources; idempotent (does nothing when all are present).
#   - Debian packages (apt-get, as root or via sudo): fonts-noto-color-emoji, unicode-data,
#     unicode-cldr-core (and libfribidi0 / libcairo2 when missing)
#   - held-out artwork: `npm pack @twemoji/svg@15.0.0` and `npm pack openmoji@17.0.0`,
#     unpacked (SVGs and licence only) into the source cache: $HOLICLIP_EMOJI_SOURCES, else
#     emoji-sources/ in holiclip's cache root ($HOLICLIP_CACHE, else $XDG_CACHE_HOME/holiclip,
#     else ~/.cache/holiclip), where the library looks for them
# The work is done by scripts/fetch_emoji_sources.py, which needs only the standard library,
# so this works before the venv exists. The library itself only finds installed sources.
# Env: PYTHON (default: .venv/bin/python if present, else python3), HOLICLIP_EMOJI_SOURCES, HOLICLIP_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
exec "$PY" scripts/fetch_emoji_sources.py "$@"  # the cache folder: the library's default
