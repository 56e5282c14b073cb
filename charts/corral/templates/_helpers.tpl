{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "corral.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already contains the chart name. */}}
{{- define "corral.fullname" -}}
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

{{- define "corral.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "corral.selectorLabels" -}}
app.kubernetes.io/name: {{ include "corral.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "corral.labels" -}}
helm.sh/chart: {{ include "corral.chart" . }}
{{ include "corral.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: corral
{{- end }}

{{- define "corral.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "corral.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the database URL, or "" when the service uses SQLite. */}}
{{- define "corral.databaseSecret" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else if .Values.database.url }}
{{- printf "%s-db" (include "corral.fullname" .) }}
{{- end }}
{{- end }}

{{- define "corral.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* "true" when the chart deploys the binding admission webhook: enabled and the service's backend is kubernetes. */}}
{{- define "corral.bindingWebhook" -}}
{{- if and .Values.kubernetes.bindingWebhook.enabled (eq (toString .Values.config.backend) "kubernetes") }}true{{ end }}
{{- end }}

{{- define "corral.bindingWebhookSecret" -}}
{{- .Values.kubernetes.bindingWebhook.existingSecret | default (printf "%s-webhook-tls" (include "corral.fullname" .)) }}
{{- end }}

{{/*
The webhook's TLS material as JSON {"ca", "crt", "key"} (PEM; ca is "" with existingSecret, whose caBundle is
given). Made once per render and kept in the root context, so the Secret, the ValidatingWebhookConfiguration and the
Deployment's checksum agree. An installed Secret is reused (lookup; helm template and lint see none and generate),
so an upgrade keeps the pair; without one, a CA and a serving certificate for the Service's DNS names.
*/}}
{{- define "corral.bindingWebhookTLS" -}}
{{- if not (hasKey . "_corralBindingWebhookTLS") }}
{{- $tls := dict "ca" "" "crt" "" "key" "" "token" (.Values.kubernetes.bindingWebhook.pathToken | default "") }}
{{- if not .Values.kubernetes.bindingWebhook.existingSecret }}
{{- $svc := include "corral.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $old := lookup "v1" "Secret" $ns (include "corral.bindingWebhookSecret" .) }}
{{- if and $old (index ($old.data | default dict) "ca.crt") (index ($old.data | default dict) "tls.crt") (index ($old.data | default dict) "tls.key") }}
{{- $tls = dict "ca" (index $old.data "ca.crt" | b64dec) "crt" (index $old.data "tls.crt" | b64dec) "key" (index $old.data "tls.key" | b64dec) "token" (index $old.data "path-token" | default ("" | b64enc) | b64dec | default (randAlphaNum 32 | lower)) }}
{{- else }}
{{- $days := int .Values.kubernetes.bindingWebhook.certDays }}
{{- $ca := genCA (printf "%s-webhook-ca" $svc) $days }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svc $ns) nil $names $days $ca }}
{{- $tls = dict "ca" $ca.Cert "crt" $cert.Cert "key" $cert.Key "token" (randAlphaNum 32 | lower) }}
{{- end }}
{{- end }}
{{- $_ := set . "_corralBindingWebhookTLS" ($tls | toJson) }}
{{- end }}
{{- index . "_corralBindingWebhookTLS" }}
{{- end }}

{{/* Base64 PEM of the CA the API server trusts for the webhook. */}}
{{- define "corral.bindingWebhookCABundle" -}}
{{- if .Values.kubernetes.bindingWebhook.existingSecret }}
{{- required "kubernetes.bindingWebhook.caBundle is required with existingSecret" .Values.kubernetes.bindingWebhook.caBundle }}
{{- else }}
{{- (include "corral.bindingWebhookTLS" . | fromJson).ca | b64enc }}
{{- end }}
{{- end }}

{{/*
"true" when `corral db upgrade` runs as a pre-install/pre-upgrade hook Job: migrations.hook.enabled and a database
URL (PostgreSQL). With SQLite the file lives in the pod's own volume, which a hook Job cannot share safely (an
emptyDir is the pod's; a ReadWriteOnce claim is held by the running pod), so the service migrates at start.
*/}}
{{- define "corral.migrationsHook" -}}
{{- if and .Values.migrations.hook.enabled (include "corral.databaseSecret" .) }}true{{ end }}
{{- end }}

{{/* The Secret the hook Job reads the URL from: the user's existingSecret, or the chart's own hook Secret. */}}
{{- define "corral.migrationsSecret" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-db-migrate" (include "corral.fullname" .) }}
{{- end }}
{{- end }}

{{/*
checksum/secret of the pod: rolls the pods when the database URL changes. The chart's own Secret: its rendered
text. An existingSecret: database.secretChecksum when given (GitOps, helm template: no cluster to ask), else the
data of the installed Secret (lookup; the pods roll on the next `helm upgrade` after it changed), else "".
*/}}
{{- define "corral.secretChecksum" -}}
{{- if .Values.database.existingSecret }}
{{- if .Values.database.secretChecksum }}
{{- .Values.database.secretChecksum | toString | sha256sum }}
{{- else }}
{{- $found := lookup "v1" "Secret" .Release.Namespace .Values.database.existingSecret }}
{{- (($found | default dict).data | default dict) | toJson | sha256sum }}
{{- end }}
{{- else }}
{{- include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* The pod's scheduling constraints: the user's affinity, else (avoidGpuNodes) off GPU nodes, spread across nodes. */}}
{{- define "corral.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else }}
{{- $a := dict }}
{{- if .Values.avoidGpuNodes.enabled }}
{{- $term := dict "matchExpressions" (list (dict "key" .Values.avoidGpuNodes.label "operator" "NotIn" "values" (list "true"))) }}
{{- $_ := set $a "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list $term))) }}
{{- end }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- $sel := dict "matchLabels" (include "corral.selectorLabels" . | fromYaml) }}
{{- $term := dict "weight" 100 "podAffinityTerm" (dict "labelSelector" $sel "topologyKey" "kubernetes.io/hostname") }}
{{- $_ := set $a "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- end }}
{{- if $a }}
{{- toYaml $a }}
{{- end }}
{{- end }}
{{- end }}

{{/* Fails the render on values that cannot work together. */}}
{{- define "corral.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "corral.databaseSecret" .)) }}
{{- fail (printf "replicaCount %d needs PostgreSQL: set database.url or database.existingSecret. With SQLite (the default) the database is one pod's file, so Corral runs as one replica (replicaCount: 1)" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.metrics.port (or (eq (int .Values.metrics.port) (int .Values.service.port)) (and (include "corral.bindingWebhook" .) (eq (int .Values.metrics.port) (int .Values.kubernetes.bindingWebhook.port)))) }}
{{- fail (printf "metrics.port %d is already the API's or the binding webhook's port" (int .Values.metrics.port)) }}
{{- end }}
{{- end }}

{{/* Labels of the hook and test pods: the release's, without the selector labels of the service's pods. */}}
{{- define "corral.auxLabels" -}}
helm.sh/chart: {{ include "corral.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: corral
{{- end }}
