{{/* The chart name, or nameOverride. */}}
{{- define "uploadhook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, or "<release>-<chart>" (just the
release name when it already contains the chart name). Kept to 50
characters, so that the "-api", "-worker" and "-migrate" suffixes stay
within 63.
*/}}
{{- define "uploadhook.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "uploadhook.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "uploadhook.labels" -}}
helm.sh/chart: {{ include "uploadhook.chart" . }}
{{ include "uploadhook.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: uploadhook
{{- end }}

{{/* What selectors match on (never changes after install). */}}
{{- define "uploadhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "uploadhook.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "api"). */}}
{{- define "uploadhook.componentLabels" -}}
{{ include "uploadhook.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "uploadhook.componentSelectorLabels" -}}
{{ include "uploadhook.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "uploadhook.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "uploadhook.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "uploadhook.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret the pods take their environment from. */}}
{{- define "uploadhook.secretName" -}}
{{- default (include "uploadhook.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* "host:port" for a listener; IPv6 addresses are written "[::]" already. */}}
{{- define "uploadhook.listen" -}}
{{- printf "%s:%d" .root.Values.bindAddress (int .port) }}
{{- end }}

{{/*
One TOML value: strings (JSON string escapes are valid TOML), booleans,
numbers (whole ones without the float64 exponent YAML gives them), arrays.
*/}}
{{- define "uploadhook.tomlValue" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}{{ $items = append $items (include "uploadhook.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "map" . }}
{{- $items := list }}
{{- range $k, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ $items = append $items (printf "%s = %s" (include "uploadhook.tomlKey" $k) (include "uploadhook.tomlValue" $v)) }}{{ end }}{{ end }}
{{- printf "{%s}" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, quoted otherwise. */}}
{{- define "uploadhook.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
A TOML table and its sub-tables: (dict "path" "storage.main" "table" $map).
Keys come sorted; null values are left out (so a value can be unset).
*/}}
{{- define "uploadhook.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- $scalars := list }}
{{- $tables := list }}
{{- range $k, $v := $table }}
{{- if kindIs "map" $v }}{{ $tables = append $tables $k }}
{{- else if not (kindIs "invalid" $v) }}{{ $scalars = append $scalars $k }}
{{- end }}
{{- end }}
{{- if and $path $scalars }}

[{{ $path }}]
{{- end }}
{{- range $scalars }}
{{ include "uploadhook.tomlKey" . }} = {{ include "uploadhook.tomlValue" (index $table .) }}
{{- end }}
{{- range $tables }}
{{- $key := include "uploadhook.tomlKey" . }}
{{- include "uploadhook.tomlTable" (dict "path" (ternary $key (printf "%s.%s" $path $key) (empty $path)) "table" (index $table .)) }}
{{- end }}
{{- end }}

{{/*
The config file: the user's `config` with what the chart decides laid over
it (listen addresses, Redis queue, no migrations at start, no embedded S3).
*/}}
{{- define "uploadhook.configToml" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- include "uploadhook.requireStorage" . }}
{{- $server := default dict (get $cfg "server") }}
{{- $_ := set $server "grpc_addr" (include "uploadhook.listen" (dict "root" . "port" .Values.ports.grpc)) }}
{{- $_ = set $server "http_addr" (include "uploadhook.listen" (dict "root" . "port" .Values.ports.http)) }}
{{- $tls := default dict (get $server "tls") }}
{{- $clientAuth := default "off" (get $tls "client_auth") }}
{{- if .Values.tls.secretName }}
{{- $_ = set $tls "cert_file" "/etc/uploadhook/tls/tls.crt" }}
{{- $_ = set $tls "key_file" "/etc/uploadhook/tls/tls.key" }}
{{- if ne $clientAuth "off" }}
{{- $_ = set $tls "client_ca_file" "/etc/uploadhook/tls/ca.crt" }}
{{- end }}
{{- $_ = set $server "tls" $tls }}
{{- else if ne $clientAuth "off" }}
{{- fail "config.server.tls.client_auth: mutual TLS needs TLS; set tls.secretName (a kubernetes.io/tls Secret with ca.crt)" }}
{{- end }}
{{- $_ = set $cfg "server" $server }}
{{- $database := default dict (get $cfg "database") }}
{{- $_ = set $database "migrate_on_start" false }}
{{- $_ = set $cfg "database" $database }}
{{- $queue := default dict (get $cfg "queue") }}
{{- $_ = set $queue "backend" "redis" }}
{{- with .Values.redisTls }}
{{- if .secretName }}
{{- if and .certKey (not .keyKey) }}
{{- fail "redisTls.keyKey: set it with redisTls.certKey (the client certificate's private key)" }}
{{- end }}
{{- if and .keyKey (not .certKey) }}
{{- fail "redisTls.certKey: set it with redisTls.keyKey" }}
{{- end }}
{{- range $key, $file := dict "redis_ca_file" .caKey "redis_client_cert_file" .certKey "redis_client_key_file" .keyKey }}
{{- if $file }}
{{- if hasKey $queue $key }}
{{- fail (printf "config.queue.%s: set by redisTls (the mounted Secret); leave it out of config" $key) }}
{{- end }}
{{- $_ = set $queue $key (printf "%s/%s" (trimSuffix "/" $.Values.redisTls.mountPath) $file) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ = set $cfg "queue" $queue }}
{{- $_ = set $cfg "embedded_s3" (dict "mode" "off") -}}
# Rendered by the uploadhook chart from .Values.config; defaults for every
# other key are in the binary (config.default.toml). Environment variables
# from the Secret (UPLOADHOOK_<SECTION>__<KEY>) override this file.
{{- include "uploadhook.tomlTable" (dict "path" "" "table" $cfg) }}
{{ end }}

{{- define "uploadhook.requireStorage" -}}
{{- if not .Values.config.storage }}
{{- fail "config.storage: set at least one connection (config.storage.<name>: {kind, bucket, …}); the embedded S3 server is off in the chart" }}
{{- end }}
{{- end }}

{{/* The Secret's data, as environment variable names. */}}
{{- define "uploadhook.secretData" -}}
{{- include "uploadhook.requireStorage" . }}
UPLOADHOOK_DATABASE__URL: {{ required "secrets.databaseUrl: set the PostgreSQL URL (postgres://user:password@host:5432/db), or secrets.existingSecret" .Values.secrets.databaseUrl | b64enc | quote }}
UPLOADHOOK_QUEUE__REDIS_URL: {{ required "secrets.redisUrl: set the Redis URL (redis://host:6379, redis+cluster://host:6379, rediss://… for TLS), or secrets.existingSecret" .Values.secrets.redisUrl | b64enc | quote }}
UPLOADHOOK_ENCRYPTION__KEYS: {{ required "secrets.encryptionKeys: set the master key ring, \"id:base64(32 bytes)\" (uploadhook keys new-master-key --id k1 prints one); on PostgreSQL the service refuses to start without it" .Values.secrets.encryptionKeys | b64enc | quote }}
{{- with .Values.secrets.storageEventsToken }}
UPLOADHOOK_EVENTS__TOKEN: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.r2ApiToken }}
UPLOADHOOK_R2_EVENTS__API_TOKEN: {{ . | b64enc | quote }}
{{- end }}
{{- range $name, $_ := .Values.config.storage }}
{{- if not (hasKey (default dict $.Values.secrets.storage) $name) }}
{{- fail (printf "secrets.storage.%s: credentials are needed for config.storage.%s (accessKeyId, secretAccessKey); uploadhook takes static keys only" $name $name) }}
{{- end }}
{{- end }}
{{- range $name, $creds := .Values.secrets.storage }}
{{- if not (hasKey (default dict $.Values.config.storage) $name) }}
{{- fail (printf "secrets.storage.%s: there is no config.storage.%s connection" $name $name) }}
{{- end }}
UPLOADHOOK_STORAGE__{{ upper $name }}__ACCESS_KEY_ID: {{ $creds.accessKeyId | b64enc | quote }}
UPLOADHOOK_STORAGE__{{ upper $name }}__SECRET_ACCESS_KEY: {{ $creds.secretAccessKey | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Refuses Secret values next to existingSecret, where they would be ignored. */}}
{{- define "uploadhook.checkSecrets" -}}
{{- $s := .Values.secrets }}
{{- if and $s.existingSecret (or $s.databaseUrl $s.redisUrl $s.encryptionKeys $s.storage $s.storageEventsToken $s.r2ApiToken) }}
{{- fail "secrets: with secrets.existingSecret, leave databaseUrl, redisUrl, encryptionKeys, storageEventsToken, r2ApiToken and storage empty (put them in that Secret)" }}
{{- end }}
{{- end }}

{{/* Volumes every pod mounts: the config file and a writable /tmp. */}}
{{- define "uploadhook.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .tlsSecret }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{- define "uploadhook.volumeMounts" -}}
- name: config
  mountPath: /etc/uploadhook
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- with .tlsSecret }}
- name: tls
  mountPath: /etc/uploadhook/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A probe from values; over HTTPS when the listeners serve TLS. */}}
{{- define "uploadhook.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if and .root.Values.tls.secretName $probe.httpGet }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* Environment: the Secret (all of its keys), then the log filter and extraEnv. */}}
{{- define "uploadhook.env" -}}
envFrom:
  - secretRef:
      name: {{ .secretName }}
{{- if or .root.Values.logLevel .root.Values.extraEnv }}
env:
  {{- with .root.Values.logLevel }}
  - name: UPLOADHOOK_LOG
    value: {{ . | quote }}
  {{- end }}
  {{- with .root.Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The container's arguments before the role. */}}
{{- define "uploadhook.globalArgs" -}}
- --config
- /etc/uploadhook/config.toml
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
