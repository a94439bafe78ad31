{{/* Chart name, overridable. */}}
{{- define "localup-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Object name prefix. Release "localup-relay" gives "localup-relay" (not
"localup-relay-localup-relay"): the names the operator looks for by default.
Truncated to 52 characters so that "<fullname>-admin" still fits 63.
*/}}
{{- define "localup-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "localup-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "localup-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "localup-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "localup-relay.labels" -}}
helm.sh/chart: {{ include "localup-relay.chart" . }}
{{ include "localup-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/part-of: localup
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "localup-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) }}
{{- end }}

{{/* The JWT Secret's name and key: the chart's own or an existing one. */}}
{{- define "localup-relay.jwtSecretName" -}}
{{- default (printf "%s-jwt" (include "localup-relay.fullname" .)) .Values.jwt.existingSecret }}
{{- end }}
{{- define "localup-relay.jwtSecretKey" -}}
{{- if .Values.jwt.existingSecret }}{{ .Values.jwt.existingSecretKey }}{{ else }}jwt-secret{{ end }}
{{- end }}

{{/* The TLS Secret's name: the chart's own or an existing one. */}}
{{- define "localup-relay.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "localup-relay.fullname" .)) .Values.tls.existingSecret }}
{{- end }}
