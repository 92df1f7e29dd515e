{{/* Names and labels shared by every object. 40 characters leave room for the longest
suffix (-operator-metrics) within the 63 a Service name may have. */}}
{{- define "bilayer.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "bilayer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "bilayer.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "bilayer.labels" -}}
app.kubernetes.io/name: {{ include "bilayer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bilayer.selector" -}}
app.kubernetes.io/name: {{ include "bilayer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bilayer.image" -}}
{{- $image := .Values.image -}}
{{- if not $image.repository -}}
{{- fail "image.repository is not set: build the image from the repository's Dockerfile, push it (docker build -t REGISTRY/bilayer:TAG . && docker push REGISTRY/bilayer:TAG) and install with --set image.repository=REGISTRY/bilayer; see the README's \"Install on a cluster\"" -}}
{{- end -}}
{{- $registry := (.Values.global).imageRegistry -}}
{{- $repository := ternary (printf "%s/%s" (trimSuffix "/" $registry) $image.repository) $image.repository (not (empty $registry)) -}}
{{- if $image.digest -}}
{{ $repository }}@{{ $image.digest }}
{{- else -}}
{{ $repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "bilayer.tokenSecret" -}}{{ .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "bilayer.fullname" .)) }}{{- end -}}
{{- define "bilayer.dataplaneService" -}}{{ include "bilayer.fullname" . }}-dataplane{{- end -}}

{{/* Every container: non-root, read-only root filesystem, no capabilities. A component's
securityContext value is merged over these (a key it sets wins, the others stay), so
adding one setting never drops the rest. Called with the override as its context. */}}
{{- define "bilayer.containerSecurity" -}}
{{- $defaults := dict
  "runAsNonRoot" true
  "runAsUser" 10001
  "runAsGroup" 10001
  "allowPrivilegeEscalation" false
  "readOnlyRootFilesystem" true
  "capabilities" (dict "drop" (list "ALL"))
  "seccompProfile" (dict "type" "RuntimeDefault")
-}}
securityContext:
  {{- mustMergeOverwrite $defaults (deepCopy (. | default dict)) | toYaml | nindent 2 }}
{{- end -}}

{{/* What the operator reads, cluster-wide or per watched namespace: it lists and
watches (its informers), never GETs one of these, and writes only status. */}}
{{- define "bilayer.readRules" -}}
- apiGroups: ["bilayer.dev"]
  resources: ["l4listeners", "l7routes"]
  verbs: ["list", "watch"]
- apiGroups: ["bilayer.dev"]
  resources: ["l4listeners/status", "l7routes/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["services", "secrets", "configmaps"]
  verbs: ["list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
{{- end -}}
