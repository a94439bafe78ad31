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

{{/* Every label but the component, which each object sets. */}}
{{- define "localup-relay.commonLabels" -}}
helm.sh/chart: {{ include "localup-relay.chart" . }}
{{ include "localup-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: localup
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "localup-relay.labels" -}}
{{ include "localup-relay.commonLabels" . }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "localup-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) }}
{{- end }}

{{/* The helm test's image: the client of the chart's appVersion unless set. */}}
{{- define "localup-relay.testImage" -}}
{{- default (printf "ghcr.io/localup-dev/localup-client:%s" .Chart.AppVersion) .Values.test.image }}
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

{{/* The admin bearer token's Secret and key: the chart's own or an existing one. */}}
{{- define "localup-relay.adminSecretName" -}}
{{- default (printf "%s-admin-token" (include "localup-relay.fullname" .)) .Values.admin.auth.existingSecret }}
{{- end }}
{{- define "localup-relay.adminSecretKey" -}}
{{- if .Values.admin.auth.existingSecret }}{{ .Values.admin.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/*
A value generated once per Secret: the one already in the cluster (an upgrade keeps
it), else random, remembered for the rest of this render so that every template that
asks gets the same one. Base64-encoded, as in a Secret's data.
Call with (dict "ctx" $ "name" SECRET "key" KEY).
*/}}
{{- define "localup-relay.generatedOnce" -}}
{{- $store := get .ctx.Values "__generated" | default dict -}}
{{- $id := printf "%s/%s" .name .key -}}
{{- if not (hasKey $store $id) }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- $_ := set $store $id (index $existing.data .key) }}
{{- else }}
{{- $_ := set $store $id (randAlphaNum 48 | b64enc) }}
{{- end }}
{{- $_ := set .ctx.Values "__generated" $store }}
{{- end }}
{{- index $store $id }}
{{- end }}

{{/*
The JWT signing secret in clear, when the chart can know it: its own generated one, or
an existing Secret it may read (lookup; empty under `helm template`).
*/}}
{{- define "localup-relay.jwtSecretValue" -}}
{{- if .Values.jwt.existingSecret }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace .Values.jwt.existingSecret }}
{{- if and $existing $existing.data (hasKey $existing.data .Values.jwt.existingSecretKey) }}
{{- index $existing.data .Values.jwt.existingSecretKey | b64dec }}
{{- end }}
{{- else }}
{{- include "localup-relay.generatedOnce" (dict "ctx" . "name" (include "localup-relay.jwtSecretName" .) "key" "jwt-secret") | b64dec }}
{{- end }}
{{- end }}

{{/*
HS256 (HMAC-SHA256) in the template language, so the chart can mint the helm test's
token (localup generate-token is not at hand at render time). Bytes are lists of
integers 0-255; a byte string reaches sha256sum through b64dec.
*/}}
{{- define "localup-relay.b64FromBytes" -}}
{{- $alphabet := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" -}}
{{- $bytes := . -}}
{{- $n := len $bytes -}}
{{- range $i := untilStep 0 $n 3 -}}
{{- $b0 := int (index $bytes $i) -}}
{{- $b1 := 0 -}}{{- $b2 := 0 -}}
{{- if lt (add $i 1) $n }}{{ $b1 = int (index $bytes (add $i 1)) }}{{ end -}}
{{- if lt (add $i 2) $n }}{{ $b2 = int (index $bytes (add $i 2)) }}{{ end -}}
{{- $v := add (mul $b0 65536) (mul $b1 256) $b2 -}}
{{- substr (int (div $v 262144)) (int (add (div $v 262144) 1)) $alphabet -}}
{{- substr (int (mod (div $v 4096) 64)) (int (add (mod (div $v 4096) 64) 1)) $alphabet -}}
{{- if lt (add $i 1) $n -}}
{{- substr (int (mod (div $v 64) 64)) (int (add (mod (div $v 64) 64) 1)) $alphabet -}}
{{- else }}={{ end -}}
{{- if lt (add $i 2) $n -}}
{{- substr (int (mod $v 64)) (int (add (mod $v 64) 1)) $alphabet -}}
{{- else }}={{ end -}}
{{- end -}}
{{- end }}

{{/* The 32 bytes of a SHA-256 hex digest, as JSON (include returns text). */}}
{{- define "localup-relay.bytesFromHex" -}}
{{- $digits := dict "0" 0 "1" 1 "2" 2 "3" 3 "4" 4 "5" 5 "6" 6 "7" 7 "8" 8 "9" 9 "a" 10 "b" 11 "c" 12 "d" 13 "e" 14 "f" 15 -}}
{{- $hex := . -}}
{{- $out := list -}}
{{- range $i := until (int (div (len $hex) 2)) -}}
{{- $hi := get $digits (substr (int (mul $i 2)) (int (add (mul $i 2) 1)) $hex) -}}
{{- $lo := get $digits (substr (int (add (mul $i 2) 1)) (int (add (mul $i 2) 2)) $hex) -}}
{{- $out = append $out (add (mul $hi 16) $lo) -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/*
base64url(HMAC-SHA256(key, msg)) without padding (RFC 7515). Call with
(dict "key" KEY "msg" MESSAGE); both are text.
*/}}
{{- define "localup-relay.hs256" -}}
{{- $key := list -}}
{{- if gt (len .key) 64 -}}
{{- $key = include "localup-relay.bytesFromHex" (sha256sum .key) | fromJsonArray -}}
{{- else -}}
{{- range $i := until (len .key) }}{{ $key = append $key (int (index $.key $i)) }}{{ end -}}
{{- end -}}
{{- range $i := until (int (sub 64 (len $key))) }}{{ $key = append $key 0 }}{{ end -}}
{{- $ipad := list -}}{{- $opad := list -}}
{{- range $b := $key -}}
{{- $i := 0 -}}{{- $o := 0 -}}
{{- range $bit := list 1 2 4 8 16 32 64 128 -}}
{{- $kb := mod (div $b $bit) 2 -}}
{{- if ne $kb (mod (div 54 $bit) 2) }}{{ $i = add $i $bit }}{{ end -}}
{{- if ne $kb (mod (div 92 $bit) 2) }}{{ $o = add $o $bit }}{{ end -}}
{{- end -}}
{{- $ipad = append $ipad $i -}}
{{- $opad = append $opad $o -}}
{{- end -}}
{{- $inner := include "localup-relay.bytesFromHex" (sha256sum (print (include "localup-relay.b64FromBytes" $ipad | b64dec) .msg)) | fromJsonArray -}}
{{- $outer := sha256sum (print (include "localup-relay.b64FromBytes" $opad | b64dec) (include "localup-relay.b64FromBytes" $inner | b64dec)) -}}
{{- include "localup-relay.b64FromBytes" (include "localup-relay.bytesFromHex" $outer | fromJsonArray) | replace "+" "-" | replace "/" "_" | trimAll "=" -}}
{{- end }}

{{- define "localup-relay.b64url" -}}
{{- . | b64enc | replace "+" "-" | replace "/" "_" | trimAll "=" -}}
{{- end }}

{{/*
The helm test's token: subject "helm-test/<release>", no expiry (the test runs whenever
`helm test` is called), pooled (test runs may overlap), accepting external connections
from no address (0.0.0.0/32 is never a source), and with the oldest possible port epoch,
so it never takes or holds back a port the localup-operator assigned. Its iat is 0, so
the same secret and release always give the same token (upgrades change nothing).
Empty when the JWT secret is unknown to the chart (an existing Secret it cannot look up).
*/}}
{{- define "localup-relay.testToken" -}}
{{- $secret := include "localup-relay.jwtSecretValue" . -}}
{{- if $secret -}}
{{- $header := include "localup-relay.b64url" (toJson (dict "alg" "HS256" "typ" "JWT")) -}}
{{- $claims := dict "sub" (printf "helm-test/%s" .Release.Name) "iat" 0 "pool" true "port_epoch" 1 "allow_from" (list "0.0.0.0/32") -}}
{{- $payload := include "localup-relay.b64url" (toJson $claims) -}}
{{- $message := printf "%s.%s" $header $payload -}}
{{- printf "%s.%s" $message (include "localup-relay.hs256" (dict "key" $secret "msg" $message)) -}}
{{- end -}}
{{- end }}

{{/* "10000-20000" -> list 10000 20000; "15000" -> list 15000 15000. */}}
{{- define "localup-relay.portBounds" -}}
{{- $parts := splitList "-" (toString .Values.portRange) -}}
{{- toJson (list (int (first $parts)) (int (last $parts))) -}}
{{- end }}

{{/*
The helm test pod's labels. Not the relay's selector labels: the Deployment's
ReplicaSet would adopt the pod, and the Services would send it traffic.
*/}}
{{- define "localup-relay.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "localup-relay.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- define "localup-relay.testLabels" -}}
helm.sh/chart: {{ include "localup-relay.chart" . }}
{{ include "localup-relay.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: test
app.kubernetes.io/part-of: localup
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
