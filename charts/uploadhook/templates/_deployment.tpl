{{/*
A Deployment for one role: (dict "root" $ "component" "api" "values" .Values.api).
api and worker differ only in their values, the role argument, and the
gRPC port (api only).
*/}}
{{- define "uploadhook.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "uploadhook.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "uploadhook.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- with $v.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "uploadhook.componentSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "uploadhook.componentSelectorLabels" $ctx | nindent 8 }}
        {{- with merge (deepCopy (default dict $v.podLabels)) (default dict $root.Values.podLabels) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "uploadhook.configToml" $root | sha256sum }}
        {{- if not $root.Values.secrets.existingSecret }}
        checksum/secret: {{ include "uploadhook.secretData" $root | sha256sum }}
        {{- end }}
        {{- with merge (deepCopy (default dict $v.podAnnotations)) (default dict $root.Values.podAnnotations) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "uploadhook.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default 30 }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "uploadhook.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- include "uploadhook.globalArgs" $root | nindent 12 }}
            - {{ .component }}
          ports:
            {{- if eq .component "api" }}
            - name: grpc
              containerPort: {{ $root.Values.ports.grpc }}
              protocol: TCP
            {{- end }}
            - name: http
              containerPort: {{ $root.Values.ports.http }}
              protocol: TCP
          {{- include "uploadhook.env" (dict "root" $root "secretName" (include "uploadhook.secretName" $root)) | nindent 10 }}
          {{- with $v.startupProbe }}
          startupProbe:
            {{- include "uploadhook.probe" (dict "probe" . "root" $root) | nindent 12 }}
          {{- end }}
          {{- with $v.livenessProbe }}
          livenessProbe:
            {{- include "uploadhook.probe" (dict "probe" . "root" $root) | nindent 12 }}
          {{- end }}
          {{- with $v.readinessProbe }}
          readinessProbe:
            {{- include "uploadhook.probe" (dict "probe" . "root" $root) | nindent 12 }}
          {{- end }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "uploadhook.volumeMounts" (dict "tlsSecret" $root.Values.tls.secretName) | nindent 12 }}
            {{- with $root.Values.redisTls }}
            {{- if .secretName }}
            - name: redis-tls
              mountPath: {{ .mountPath }}
              readOnly: true
            {{- end }}
            {{- end }}
      volumes:
        {{- include "uploadhook.volumes" (dict "configMap" (include "uploadhook.fullname" $root) "tlsSecret" $root.Values.tls.secretName) | nindent 8 }}
        {{- /* redisTls: the Secret with Redis's CA and client certificate. */}}
        {{- with $root.Values.redisTls }}
        {{- if .secretName }}
        - name: redis-tls
          secret:
            secretName: {{ .secretName }}
        {{- end }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* An HPA for one role, when enabled. */}}
{{- define "uploadhook.hpa" -}}
{{- $root := .root }}
{{- $a := .values.autoscaling }}
{{- $ctx := dict "root" $root "component" .component }}
{{- if $a.enabled }}
{{- if not (or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage) }}
{{- fail (printf "%s.autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" .component) }}
{{- end }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas exceeds maxReplicas" .component) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "uploadhook.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "uploadhook.componentLabels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "uploadhook.fullname" $root }}-{{ .component }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- with $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget for one role, when enabled. */}}
{{- define "uploadhook.pdb" -}}
{{- $root := .root }}
{{- $p := .values.pdb }}
{{- $ctx := dict "root" $root "component" .component }}
{{- if $p.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "uploadhook.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "uploadhook.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $p.minAvailable) }}
  minAvailable: {{ $p.minAvailable }}
  {{- else if not (kindIs "invalid" $p.maxUnavailable) }}
  maxUnavailable: {{ $p.maxUnavailable }}
  {{- else }}
  {{- fail (printf "%s.pdb: set minAvailable or maxUnavailable" .component) }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "uploadhook.componentSelectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}
