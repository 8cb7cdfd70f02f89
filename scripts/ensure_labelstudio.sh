#!/usr/bin/env bash
# Installs Label Studio into its own virtual environment, reused when already present.
#
# Label Studio pins Django, label-studio-sdk and friends at versions that conflict with the
# project's own requirements, so it never shares the project's interpreter. The venv lives at a
# stable path so that CI caches and later test runs reuse it (the first install takes 2-4 minutes).
#
# Usage: scripts/ensure_labelstudio.sh            # prints the venv path as the last line
# Env:   LS_VERSION        Label Studio version          (default 1.23.2)
#        GPT4ROI_LS_CACHE  cache folder                  (default $HOME/.cache/gpt4roi-ls)
#        GPT4ROI_LS_VENV   where the venv lives          (default $GPT4ROI_LS_CACHE/venv-$LS_VERSION)
#        PYTHON            interpreter that builds it    (default python3)
set -euo pipefail

LS_VERSION="${LS_VERSION:-1.23.2}"
CACHE="${GPT4ROI_LS_CACHE:-${HOME}/.cache/gpt4roi-ls}"
VENV="${GPT4ROI_LS_VENV:-${CACHE}/venv-${LS_VERSION}}"
PYTHON="${PYTHON:-python3}"
MARKER="${VENV}/.gpt4roi-ls-complete"

is_ready() {
    # The marker is written only after a successful install, so an interrupted one is redone.
    [[ -f "${MARKER}" ]] && [[ -x "${VENV}/bin/label-studio" ]] \
        && "${VENV}/bin/python" - "${LS_VERSION}" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import label_studio  # noqa: F401  (fails when the venv is broken)
sys.exit(0 if version("label-studio") == sys.argv[1] else 1)
PY
}

mkdir -p "$(dirname "${VENV}")"
# Serialize concurrent callers (CI step and pytest fixture) so that only one of them installs.
exec 9>"${VENV}.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

if is_ready; then
    echo "label-studio ${LS_VERSION} already installed" >&2
    echo "${VENV}"
    exit 0
fi

echo "installing label-studio ${LS_VERSION} into ${VENV}" >&2
start=$(date +%s)
rm -rf "${VENV}"
"${PYTHON}" -m venv "${VENV}"
"${VENV}/bin/python" -m pip install --quiet --quiet --upgrade pip >&2
"${VENV}/bin/python" -m pip install --quiet --quiet "label-studio==${LS_VERSION}" >&2
if ! "${VENV}/bin/python" -c "import label_studio" >&2; then
    echo "label-studio ${LS_VERSION} installed but does not import; see the error above" >&2
    exit 1
fi
touch "${MARKER}"
echo "installed label-studio ${LS_VERSION} in $(( $(date +%s) - start )) s" >&2
echo "${VENV}"
