{{/* Name of every object the chart makes: the release name, with the chart's name unless it already has it. */}}
{{- define "neuronmodel-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "neuronmodel-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "neuronmodel-operator.labels" -}}
{{ include "neuronmodel-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the chart's appVersion. */}}
{{- define "neuronmodel-operator.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion) -}}
{{- end -}}

{{/* Peering is on when several replicas must agree which one works (Kopf's --peering). */}}
{{- define "neuronmodel-operator.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end -}}
{{- end -}}

{{/*
The rules the operator needs on NeuronModels and their children, wherever it serves them. Every verb is one the
code uses: Kopf lists and watches (indexes, event handlers; no finalizers, no progress annotations, so it never
writes a NeuronModel); the reconcile creates Jobs, Deployments, Services and ConfigMaps, replaces (PUT: update)
the last three, patches Deployment replicas and NeuronModel status, deletes superseded Jobs and the batching
ConfigMap once batching is off, and reads a child whose create found its name taken (ours, or someone else's); events are posted
through the core API by Kopf (kopf.info/kopf.warn), and a Job's are listed while it has no pod (the Job controller
tells a pod it could not create only as a FailedCreate Event). Pods are only read, to report why they do not run.
*/}}
{{- define "neuronmodel-operator.rules" -}}
- apiGroups: [serving.neuron.dev]
  resources: [neuronmodels]
  verbs: [list, watch]
- apiGroups: [serving.neuron.dev]
  resources: [neuronmodels/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, get, create, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, get, create, update, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, get, create, update]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, watch, get, create, update, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, get, create, update, delete]
# Only used where the Prometheus operator's CRD is installed: a ServiceMonitor per model for its TF Serving metrics.
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [list, watch, get, create, update, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end -}}

{{/*
Kopf's peering objects: it lists and watches them all (peers of any name), and patches its keep-alives into the
status of its own, the only one it may write.
*/}}
{{- define "neuronmodel-operator.peeringRules" -}}
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  resourceNames: [{{ .name }}]
  verbs: [get, patch]  # get: a delayed reconcile checks that no peer of higher priority is alive
{{- end -}}
