{{/* Chart name. */}}
{{- define "credwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "credwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "credwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the pods (no chart version: a chart bump alone does not restart agents). */}}
{{- define "credwatch.podLabels" -}}
{{ include "credwatch.selectorLabels" . }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: credwatch
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
{{- end }}

{{- define "credwatch.labels" -}}
{{ include "credwatch.podLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "credwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "credwatch.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-secrets" (include "credwatch.fullname" .) }}
{{- end }}
{{- end }}

{{/* All added capabilities. */}}
{{- define "credwatch.capabilities" -}}
{{- concat .Values.securityContext.capabilities .Values.securityContext.extraCapabilities | uniq | toJson }}
{{- end }}

{{/* [metrics] listen: host:port, brackets around an IPv6 address. */}}
{{- define "credwatch.metricsListen" -}}
{{- if contains ":" .Values.metrics.bindAddress }}
{{- printf "[%s]:%v" .Values.metrics.bindAddress .Values.metrics.port }}
{{- else }}
{{- printf "%s:%v" .Values.metrics.bindAddress .Values.metrics.port }}
{{- end }}
{{- end }}

{{/* credwatch.toml. Paths are host paths; per-node values come from the environment. */}}
{{- define "credwatch.config" -}}
# Rendered for the credwatch DaemonSet; per-node values come from the environment.

[kubernetes]
# Replaced per node by CREDWATCH_KUBELET_URL (the pod does not share the node's network).
kubelet_url = "https://127.0.0.1:10250"
token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
{{- if .Values.kubelet.insecureSkipTLSVerify }}
# Explicit opt-in (kubelet.insecureSkipTLSVerify): the kubelet's certificate is not checked,
# so whatever answers on the node's port 10250 receives the agent's token and can forge pod
# identities. The agent warns at start.
insecure_skip_tls_verify = true
{{- else }}
# The kubelet's serving certificate is verified: with serverTLSBootstrap the cluster CA
# signs it (kubernetes.io/kubelet-serving), which every pod has in its service-account
# ca.crt; otherwise mount the kubelet serving CA and point ca_file at it. Turning the
# check off (insecure_skip_tls_verify = true) sends the agent's token to whatever
# answers on the node's port 10250 and lets it name every pod; the agent warns.
ca_file = {{ required "kubelet.caFile (or the explicit kubelet.insecureSkipTLSVerify)" .Values.kubelet.caFile | quote }}
{{- end }}
kubelet_root = {{ .Values.kubelet.root | quote }}
trust_domain = {{ .Values.kubelet.trustDomain | quote }}

[fingerprint]
# One key for the whole fleet, so fingerprints compare across nodes (Secret {{ include "credwatch.secretName" . }}).
key_file = "/etc/credwatch/secret/fingerprint.key"
{{- if .Values.clickhouse.enabled }}

[clickhouse]
url = {{ .Values.clickhouse.url | quote }}
database = {{ .Values.clickhouse.database | quote }}
user = {{ .Values.clickhouse.user | quote }}
password_file = "/etc/credwatch/secret/clickhouse-password"
{{- end }}

[metrics]
# /metrics and /healthz for Prometheus and the kubelet's probes, on the pod IP only
# (CREDWATCH_METRICS_ADDRESS replaces the address) and, by the NetworkPolicy, reachable
# from the monitoring namespace's Prometheus and the node only.
listen = {{ include "credwatch.metricsListen" . | quote }}
{{- with .Values.config | trim }}

{{ . }}
{{- end }}
{{- end }}
