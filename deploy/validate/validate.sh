#!/usr/bin/env bash
# Validates everything under deploy/, offline:
#   - kustomize builds (base, and an overlay with both components);
#   - helm lint --strict and helm template (Helm 4, and Helm 3 when HELM3 is set) for the
#     default values and for option variants;
#   - every rendered object against the Kubernetes JSON schemas (strict: unknown fields are
#     errors) of each version in K8S_VERSIONS;
#   - helm template with default values == kustomize build, object by object (compare.py);
#   - credwatch check-config on each rendered credwatch.toml and the systemd example, when
#     CREDWATCH_BIN is set;
#   - systemd-analyze verify (any message fails) and security --offline on the unit;
#   - with SANDBOX=1 (root, a kernel that runs the probes, CREDWATCH_BIN): the agent run
#     under the unit's restrictions (systemd_sandbox.py).
#
#   TOOLS=~/.local/share/credwatch/tools   # where install-tools.sh put helm etc.
#   deploy/validate/validate.sh
#
# Tools: HELM, HELM3, KUBECTL, KUBERNETES_VALIDATE, PYTHON (with PyYAML), SYSTEMD_ANALYZE;
# each defaults to $TOOLS/bin/<name> when present, else to the command on PATH.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPLOY=$(dirname "$HERE")
TOOLS=${TOOLS:-${XDG_DATA_HOME:-$HOME/.local/share}/credwatch/tools}
tool() { if [[ -x $TOOLS/bin/$1 ]]; then echo "$TOOLS/bin/$1"; else command -v "$1" || true; fi; }
HELM=${HELM:-$(tool helm)}
HELM3=${HELM3:-$(tool helm3)}
KUBECTL=${KUBECTL:-$(tool kubectl)}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-$(tool kubernetes-validate)}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $TOOLS/venv/bin/python ]]; then PYTHON=$TOOLS/venv/bin/python; else PYTHON=python3; fi
fi
SYSTEMD_ANALYZE=${SYSTEMD_ANALYZE:-$(command -v systemd-analyze || true)}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.33.0 1.37.0"}
CREDWATCH_BIN=${CREDWATCH_BIN:-}

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
passed=0
failed=0
skipped=0
step() { # step NAME CMD...: run, record, print the output only on failure
  local name=$1
  shift
  local log="$OUT/log.$((passed + failed + skipped))"
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "ok    $name ($((SECONDS - t0))s)"
  else
    failed=$((failed + 1))
    echo "FAIL  $name"
    sed 's/^/      /' "$log"
  fi
}
skip() {
  skipped=$((skipped + 1))
  echo "skip  $1"
}
need() { [[ -n $1 && -x $1 ]]; }

# -- render -------------------------------------------------------------------------
if need "$KUBECTL"; then
  step "kustomize build deploy/kubernetes" \
    sh -c "'$KUBECTL' kustomize '$DEPLOY/kubernetes' > '$OUT/kustomize.yaml' || { rm -f '$OUT/kustomize.yaml'; exit 1; }"
  # kustomize only takes relative paths to other kustomizations: overlay a copy.
  cp -r "$DEPLOY/kubernetes" "$OUT/kubernetes"
  mkdir -p "$OUT/overlay"
  cat >"$OUT/overlay/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../kubernetes
components:
  - ../kubernetes/components/kubelet-nodes-proxy
  - ../kubernetes/components/seccomp-unconfined
EOF
  step "kustomize build with both components" \
    sh -c "'$KUBECTL' kustomize '$OUT/overlay' > '$OUT/kustomize-components.yaml' || { rm -f '$OUT/kustomize-components.yaml'; exit 1; }"
else
  skip "kustomize (no kubectl)"
fi

CHART=$DEPLOY/helm/credwatch
# Every other option that changes the rendering, at once.
cat >"$OUT/variant-values.yaml" <<'EOF'
secrets:
  create: false
  existingSecret: my-secret
clickhouse:
  enabled: false
kubelet:
  caFile: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
securityContext:
  extraCapabilities: [SYS_ADMIN]
  seLinuxOptions: {type: spc_t}
metrics:
  bindAddress: "::"
  podAnnotations: false
  service:
    enabled: false
serviceAccount:
  create: false
  name: credwatch-existing
extraHostMounts:
  - name: host-srv
    path: /srv
extraArgs: [--stats-file, /var/lib/credwatch/stats.json]
extraEnv:
  - name: EXTRA
    value: "1"
podLabels: {team: security}
podAnnotations: {example.com/owner: security}
imagePullSecrets: [{name: regcred}]
EOF
# name|helm arguments
VARIANTS=(
  "default|"
  "namespace|--set namespace.create=true"
  "options|--set rbac.nodesProxy=true --set securityContext.seccompProfile.type=Unconfined"
  "opt-outs|--set kubelet.insecureSkipTLSVerify=true --set metrics.bindPodIP=false --set networkPolicy.enabled=false"
  "variant|-f $OUT/variant-values.yaml"
)
for h in "$HELM" "$HELM3"; do
  need "$h" || continue
  v=$(basename "$h")
  step "$v lint --strict" "$h" lint --strict "$CHART"
  for entry in "${VARIANTS[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    # shellcheck disable=SC2086
    step "$v template $name" sh -c "'$h' template credwatch '$CHART' --namespace credwatch $args > '$OUT/$v-$name.yaml' || { rm -f '$OUT/$v-$name.yaml'; exit 1; }"
  done
done
need "$HELM" || skip "helm (not installed: deploy/validate/install-tools.sh)"
need "$HELM3" || skip "helm3 (not installed)"

# -- schema validation --------------------------------------------------------------
kv() { # kv FILE VERSION: strict schema validation; a kind without a schema is an error too
  local out
  out=$("$KUBERNETES_VALIDATE" --strict --quiet -k "$2" "$1" 2>&1)
  local rc=$?
  echo "$out"
  [[ $rc -eq 0 && $out != *"Couldn't find schema"* && $out != *ERROR* ]]
}
rendered=$(cd "$OUT" && ls ./*.yaml 2>/dev/null | sed 's|^\./||' | grep -vx 'variant-values.yaml')
if need "$KUBERNETES_VALIDATE"; then
  for f in $rendered; do
    for ver in $K8S_VERSIONS; do
      step "schema $ver ${f%.yaml}" kv "$OUT/$f" "$ver"
    done
  done
else
  skip "schemas (no kubernetes-validate: deploy/validate/install-tools.sh)"
fi

# -- helm == kustomize --------------------------------------------------------------
cmp() { "$PYTHON" "$HERE/compare.py" "$@"; }
for h in "$HELM" "$HELM3"; do
  need "$h" && [[ -f $OUT/kustomize.yaml && -f $OUT/kustomize-components.yaml ]] || continue
  v=$(basename "$h")
  step "$v default == kustomize (all but the Namespace)" \
    cmp "$OUT/kustomize.yaml" "$OUT/$v-default.yaml" --ignore-kind Namespace
  step "$v namespace.create=true == kustomize" \
    cmp "$OUT/kustomize.yaml" "$OUT/$v-namespace.yaml"
  step "$v options == kustomize with both components" \
    cmp "$OUT/kustomize-components.yaml" "$OUT/$v-options.yaml" --ignore-kind Namespace
done

# -- credwatch.toml -----------------------------------------------------------------
if need "$CREDWATCH_BIN"; then
  n=0
  for f in $rendered; do
    "$PYTHON" - "$OUT/$f" "$OUT/toml" <<'EOF' || true
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "ConfigMap" and "credwatch.toml" in d.get("data", {}):
        open(sys.argv[2] + "." + sys.argv[1].rsplit("/", 1)[-1].removesuffix(".yaml") + ".toml", "w").write(d["data"]["credwatch.toml"])
EOF
  done
  for t in "$OUT"/toml.*.toml "$DEPLOY/systemd/credwatch.toml"; do
    [[ -f $t ]] || continue
    n=$((n + 1))
    step "check-config $(basename "$t" | sed 's/^toml\.//')" "$CREDWATCH_BIN" check-config "$t"
  done
else
  skip "check-config (CREDWATCH_BIN not set)"
fi

# -- systemd ------------------------------------------------------------------------
if need "$SYSTEMD_ANALYZE" && [[ -d /usr/lib/systemd/system || -d /lib/systemd/system ]]; then
  # A root holding the machine's units, the unit, and a stand-in binary at the unit's path.
  root=$OUT/sdroot
  mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/local/bin"
  cp -a "$([[ -d /usr/lib/systemd/system ]] && echo /usr/lib/systemd/system || echo /lib/systemd/system)" "$root/usr/lib/systemd/"
  cp "$DEPLOY/systemd/credwatch.service" "$root/etc/systemd/system/"
  printf '#!/bin/sh\n' >"$root/usr/local/bin/credwatch"
  chmod 0755 "$root/usr/local/bin/credwatch"
  verify() { # fails on any message: unknown keys and bad values are only warnings
    local out
    out=$("$SYSTEMD_ANALYZE" verify --root="$root" credwatch.service 2>&1)
    local rc=$?
    echo "$out"
    [[ $rc -eq 0 && -z $out ]]
  }
  step "systemd-analyze verify credwatch.service" verify
  # Exposure is reported as 0.0-10.0; the threshold is in tenths. The unit scores 3.0.
  step "systemd-analyze security --offline (exposure <= 3.5)" \
    "$SYSTEMD_ANALYZE" security --offline=true --root="$root" --threshold=35 --no-pager credwatch.service
else
  skip "systemd-analyze"
fi
if [[ ${SANDBOX:-0} == 1 ]]; then
  if need "$CREDWATCH_BIN"; then
    step "credwatch under the unit's sandbox (systemd_sandbox.py)" \
      /usr/bin/python3 "$HERE/systemd_sandbox.py" --unit "$DEPLOY/systemd/credwatch.service" --binary "$CREDWATCH_BIN"
  else
    skip "sandbox (CREDWATCH_BIN not set)"
  fi
fi

echo "deploy validation: $passed passed, $failed failed, $skipped skipped"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
