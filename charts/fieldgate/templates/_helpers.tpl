{{- define "fieldgate.name" -}}fieldgate{{- end -}}

{{- define "fieldgate.labels" -}}
app.kubernetes.io/part-of: fieldgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "fieldgate.operator.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "fieldgate.gateway.name" -}}{{ .Release.Name }}-gateway{{- end -}}

{{- define "fieldgate.image" -}}
{{- $reg := .root.Values.imageRegistry -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if $reg }}{{ printf "%s/%s:%s" (trimSuffix "/" $reg) .image.repository $tag }}{{ else }}{{ printf "%s:%s" .image.repository $tag }}{{ end -}}
{{- end -}}

{{/* Pod Security Standard "restricted" container settings. */}}
{{- define "fieldgate.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
