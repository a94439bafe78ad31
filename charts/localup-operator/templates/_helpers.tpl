{{- define "localup-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Object name prefix. Release "localup-operator" gives "localup-operator": the names the
operator uses by default. Truncated to 48 characters so "<fullname>-webhook-tls" fits 63.
*/}}
{{- define "localup-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "localup-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "localup-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "localup-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "localup-operator.labels" -}}
helm.sh/chart: {{ include "localup-operator.chart" . }}
{{ include "localup-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: localup
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "localup-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "localup-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "localup-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) }}
{{- end }}

{{- define "localup-operator.relayNamespace" -}}
{{- default .Release.Namespace .Values.relay.namespace }}
{{- end }}

{{- define "localup-operator.webhookService" -}}
{{- include "localup-operator.fullname" . }}-webhook
{{- end }}

{{- define "localup-operator.webhookCertSecret" -}}
{{- include "localup-operator.fullname" . }}-webhook-tls
{{- end }}

{{/*
The sidecar's image: the client of the same release as the operator unless set.
*/}}
{{- define "localup-operator.clientImage" -}}
{{- default (printf "ghcr.io/localup-dev/localup-client:%s" .Chart.AppVersion) .Values.sidecar.image }}
{{- end }}
