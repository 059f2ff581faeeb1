{{/* The chart name, or nameOverride. */}}
{{- define "cloudlb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: fullnameOverride, or the release name when it already contains the chart
name, or <release>-<chart>. Names every object (cluster-scoped ones too, so two releases in two
namespaces do not collide).
*/}}
{{- define "cloudlb.fullname" -}}
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

{{- define "cloudlb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cloudlb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudlb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cloudlb.labels" -}}
helm.sh/chart: {{ include "cloudlb.chart" . }}
{{ include "cloudlb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cloudlb
{{- end }}

{{- define "cloudlb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cloudlb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cloudlb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Settings that would make a broken install fail at render time instead of at run time. */}}
{{- define "cloudlb.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true: without it every replica writes to the cloud" }}
{{- end }}
{{- if and .Values.defaultClass.enabled (not (index .Values.providers .Values.defaultClass.provider).enabled) }}
{{- fail (printf "defaultClass.provider is %q but providers.%s.enabled is false: enable that provider or change the class" .Values.defaultClass.provider .Values.defaultClass.provider) }}
{{- end }}
{{- if and (not .Values.providers.aws.enabled) (not .Values.providers.local.enabled) }}
{{- fail "providers.aws.enabled and providers.local.enabled are both false: enable at least one" }}
{{- end }}
{{- end }}
