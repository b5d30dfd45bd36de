{{/* Labels every MedBridge object carries */}}
{{- define "medbridge.labels" -}}
app.kubernetes.io/name: medbridge
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The pod security context: the image's non-root user */}}
{{- define "medbridge.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* The container security context */}}
{{- define "medbridge.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end }}

{{/* What every MedBridge process needs: the broker, the database, the knowledge base, the partition count */}}
{{- define "medbridge.env" -}}
- {name: KAFKA_BOOTSTRAP_SERVERS, value: {{ .Values.kafka.bootstrapServers | quote }}}
- {name: MEDBRIDGE_KAFKA_PARTITIONS, value: {{ .Values.kafka.partitions | quote }}}
- {name: CHROMA_URL, value: {{ .Values.chromaUrl | quote }}}
- name: DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ .Values.databaseUrlSecret.name }}, key: {{ .Values.databaseUrlSecret.key }}}}
{{- end }}
