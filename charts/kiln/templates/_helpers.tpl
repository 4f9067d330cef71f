{{/* Base name of everything this release creates: the release name, at most 54 characters. */}}
{{- define "kiln.fullname" -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{- define "kiln.operatorName" -}}
{{- printf "%s-operator" (include "kiln.fullname" .) -}}
{{- end -}}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kiln.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: kiln-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.labels" -}}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kiln
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
What the operator may do, and nothing more: read its resources and write their status, manage
the per-pool children it owns, read pods for status, and record Events. It never reads Secrets:
model-server pods get credentials through envFrom. (The leader-election Lease is a separate Role
in the release namespace.)
*/}}
{{- define "kiln.operatorRules" -}}
- apiGroups: ["kiln.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kiln.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
