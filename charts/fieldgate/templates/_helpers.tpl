{{- define "fieldgate.name" -}}fieldgate{{- end -}}

{{- define "fieldgate.labels" -}}
app.kubernetes.io/part-of: fieldgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "fieldgate.operator.name" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "fieldgate.gateway.name" -}}{{ .Release.Name }}-gateway{{- end -}}
{{/* The ConfigMap with the CA of the operator's credentials endpoint. */}}
{{- define "fieldgate.credentialsCa" -}}{{ .Release.Name }}-credentials-ca{{- end -}}
{{/* Audience of the gateways' projected tokens for the credentials endpoint. */}}
{{- define "fieldgate.credentialsAudience" -}}fieldgate-credentials{{- end -}}

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

{{/* The gateway's device listeners, by their key under gateway.listeners. */}}
{{- define "fieldgate.listenerNames" -}}coap tcp udp{{- end -}}

{{/* The transport protocol of a listener (its key given). */}}
{{- define "fieldgate.listenerProtocol" -}}{{ if eq . "tcp" }}TCP{{ else }}UDP{{ end }}{{- end -}}

{{/* Fails on listener ports that would collide inside the gateway pod. */}}
{{- define "fieldgate.checkListeners" -}}
{{- $g := .Values.gateway -}}
{{- $l := $g.listeners -}}
{{- if eq (int $l.coap.port) (int $l.udp.port) -}}
{{- fail (printf "gateway.listeners.coap.port and gateway.listeners.udp.port are both UDP port %d: choose two ports" (int $l.coap.port)) -}}
{{- end -}}
{{- range $taken := list (int $g.metricsPort) 4222 8222 -}}
{{- if eq (int $l.tcp.port) $taken -}}
{{- fail (printf "gateway.listeners.tcp.port %d is taken in the gateway pod (gateway.metricsPort, NATS 4222 and 8222)" $taken) -}}
{{- end -}}
{{- end -}}
{{- end -}}
