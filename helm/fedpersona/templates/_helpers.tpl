{{/*
Names, labels, images and the few derived values several templates share. Checks that span
several values (what values.schema.json cannot express) fail the render here, with the key named.
*/}}

{{- define "fedpersona.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; components append "-gateway", "-vllm", ... (kept under 63 chars). */}}
{{- define "fedpersona.fullname" -}}
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

{{- define "fedpersona.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedpersona.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedpersona.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedpersona.labels" -}}
helm.sh/chart: {{ include "fedpersona.chart" . }}
{{ include "fedpersona.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedpersona
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "fedpersona.componentSelectorLabels" -}}
{{ include "fedpersona.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fedpersona.componentLabels" -}}
{{ include "fedpersona.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fedpersona.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedpersona.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway/trainer image. */}}
{{- define "fedpersona.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fedpersona.vllmImage" -}}
{{- printf "%s:%s" .Values.vllm.image.repository (default .Chart.AppVersion .Values.vllm.image.tag) }}
{{- end }}

{{- define "fedpersona.modelInitImage" -}}
{{- $img := .Values.model.init.image }}
{{- if $img.repository }}
{{- printf "%s:%s" $img.repository (default "latest" $img.tag) }}
{{- else }}
{{- include "fedpersona.image" . }}
{{- end }}
{{- end }}

{{- define "fedpersona.imagePullSecrets" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names (ternary .name . (kindIs "map" .)) }}
{{- end }}
{{- with include "fedpersona.registrySecretName" . }}
{{- $names = append $names . }}
{{- end }}
{{- if $names -}}
imagePullSecrets:
{{- range $names | uniq }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secrets ----------------------------------------------------------------------------- */}}

{{- define "fedpersona.adminSecretName" -}}
{{- default (printf "%s-admin" (include "fedpersona.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "fedpersona.adminSecretKey" -}}
{{- ternary .Values.auth.existingSecretKey "admin-key" (ne .Values.auth.existingSecret "") }}
{{- end }}

{{/* The engine key shared by the gateway and vLLM: the chart's Secret unless one is named. */}}
{{- define "fedpersona.engineSecretName" -}}
{{- default (printf "%s-engine" (include "fedpersona.fullname" .)) .Values.vllm.apiKey.existingSecret }}
{{- end }}

{{- define "fedpersona.engineSecretKey" -}}
{{- ternary .Values.vllm.apiKey.existingSecretKey "engine-key" (ne .Values.vllm.apiKey.existingSecret "") }}
{{- end }}

{{- define "fedpersona.engineKeyRef" -}}
valueFrom:
  secretKeyRef:
    name: {{ include "fedpersona.engineSecretName" . }}
    key: {{ include "fedpersona.engineSecretKey" . }}
{{- end }}

{{- define "fedpersona.registrySecretName" -}}
{{- if .Values.registryCredentials.existingSecret }}
{{- .Values.registryCredentials.existingSecret }}
{{- else if .Values.registryCredentials.create }}
{{- printf "%s-registry" (include "fedpersona.fullname" .) }}
{{- end }}
{{- end }}

{{/* Storage --------------------------------------------------------------------------------- */}}

{{- define "fedpersona.homeClaimName" -}}
{{- default (printf "%s-home" (include "fedpersona.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Directory of the large model as vLLM sees it. */}}
{{- define "fedpersona.modelDir" -}}
{{- if .Values.model.existingClaim }}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.path) | trimSuffix "/" }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.persistence.mountPath) (trimPrefix "/" .Values.model.path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{- define "fedpersona.storeDir" -}}
{{- printf "%s/store" (trimSuffix "/" .Values.persistence.mountPath) }}
{{- end }}

{{- define "fedpersona.smallModelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.persistence.mountPath) (trimPrefix "/" .Values.proxyTuning.smallModelPath) | trimSuffix "/" }}
{{- end }}

{{/* Engine ---------------------------------------------------------------------------------- */}}

{{- define "fedpersona.vllmServiceName" -}}
{{- printf "%s-vllm" (include "fedpersona.fullname" .) }}
{{- end }}

{{/* "true" when the chart runs more than one vLLM replica (StatefulSet + headless Service). */}}
{{- define "fedpersona.vllmReplicated" -}}
{{- and .Values.vllm.enabled (gt (int .Values.vllm.replicas) 1) | toString }}
{{- end }}

{{- define "fedpersona.vllmHeadlessName" -}}
{{- printf "%s-vllm-headless" (include "fedpersona.fullname" .) }}
{{- end }}

{{/* The gateway's replica discovery (FEDPERSONA_REPLICAS_DNS), only with several replicas. */}}
{{- define "fedpersona.replicaEnv" -}}
{{- if eq (include "fedpersona.vllmReplicated" .) "true" }}
- name: FEDPERSONA_REPLICAS_DNS
  value: {{ printf "%s.%s.svc.cluster.local:%d" (include "fedpersona.vllmHeadlessName" .) .Release.Namespace (int .Values.vllm.port) | quote }}
{{- end }}
{{- end }}

{{/* Where the gateway sends OpenAI requests. */}}
{{- define "fedpersona.engineUrl" -}}
{{- if .Values.vllm.enabled }}
{{- printf "http://%s:%d" (include "fedpersona.vllmServiceName" .) (int .Values.vllm.port) }}
{{- else }}
{{- required "vllm.externalUrl is required when vllm.enabled is false" .Values.vllm.externalUrl | trimSuffix "/" }}
{{- end }}
{{- end }}

{{- define "fedpersona.trainerServiceName" -}}
{{- printf "%s-trainer" (include "fedpersona.fullname" .) }}
{{- end }}

{{- define "fedpersona.superlinkServiceName" -}}
{{- printf "%s-superlink" (include "fedpersona.fullname" .) }}
{{- end }}

{{/* The SuperLink's TLS Secret (ca.crt, tls.crt, tls.key): the user's, or the generated one. */}}
{{- define "fedpersona.superlinkTlsSecretName" -}}
{{- .Values.trainer.superlink.tls.existingSecret | default (printf "%s-superlink-tls" (include "fedpersona.fullname" .)) }}
{{- end }}

{{/* The node bindings Secret (key node-bindings.json): the user's, or the one rendered from values. */}}
{{- define "fedpersona.nodeBindingsSecretName" -}}
{{- .Values.trainer.superlink.auth.existingBindingsSecret | default (printf "%s-node-bindings" (include "fedpersona.fullname" .)) }}
{{- end }}

{{/* Where the trainer pod mounts the SuperLink's TLS files and the node bindings. */}}
{{- define "fedpersona.superlinkTlsDir" -}}/etc/fedpersona/tls{{- end }}
{{- define "fedpersona.nodeBindingsFile" -}}/etc/fedpersona/node-bindings/node-bindings.json{{- end }}

{{/*
The vLLM server's flags after the module name. Same flags, same order as
fedpersona.service.engine.config.engine_argv (tests/helm compares the two): the chart's GPU flags travel
as the engine's extra args, after the flags the engine owns.
*/}}
{{- define "fedpersona.vllmArgs" -}}
{{- $v := .Values.vllm -}}
- --model
- {{ include "fedpersona.modelDir" . | quote }}
- --served-model-name
- {{ .Values.model.name | quote }}
- --enable-lora
- --max-loras
- {{ $v.maxLoras | int | quote }}
- --max-cpu-loras
- {{ $v.maxCpuLoras | int | quote }}
- --max-lora-rank
- {{ $v.maxLoraRank | int | quote }}
- --max-model-len
- {{ $v.maxModelLen | int | quote }}
- --dtype
- {{ $v.dtype | quote }}
- --host
- "0.0.0.0"
- --port
- {{ $v.port | int | quote }}
- --disable-uvicorn-access-log
# Every path but GET /health and /metrics needs the engine key (VLLM_API_KEY below).
- --middleware
- fedpersona.service.engine.guard.EngineKeyGuard
{{- if .Values.proxyTuning.enabled }}
- --logits-processors
- {{ .Values.proxyTuning.processor | quote }}
{{- end }}
{{- range include "fedpersona.vllmExtraArgs" . | fromJsonArray }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The engine's extra args (JSON list): GPU sizing from the values, then vllm.extraArgs. */}}
{{- define "fedpersona.vllmExtraArgs" -}}
{{- $v := .Values.vllm }}
{{- $args := list }}
{{- if gt (int $v.gpus) 0 }}
{{- $args = concat $args (list "--gpu-memory-utilization" (toString $v.gpuMemoryUtilization)) }}
{{- if gt (int $v.gpus) 1 }}
{{- $args = concat $args (list "--tensor-parallel-size" (toString (int $v.gpus))) }}
{{- end }}
{{- end }}
{{- range $v.extraArgs }}
{{- $args = append $args (toString .) }}
{{- end }}
{{- toJson $args }}
{{- end }}

{{/*
The engine settings (fedpersona.service.engine.config.EngineSettings, env FEDPERSONA_ENGINE__...) that
match the vLLM flags above. The gateway reads them; on the vLLM container they make
`fedpersona engine --exec` start exactly the command the chart renders (tests/helm checks it).
*/}}
{{- define "fedpersona.engineSettingsEnv" -}}
{{- $v := .Values.vllm -}}
- name: FEDPERSONA_ENGINE__API_KEY
  {{- include "fedpersona.engineKeyRef" . | nindent 2 }}
- name: FEDPERSONA_ENGINE__MODEL_DIR
  value: {{ include "fedpersona.modelDir" . | quote }}
- name: FEDPERSONA_ENGINE__SERVED_MODEL_NAME
  value: {{ .Values.model.name | quote }}
- name: FEDPERSONA_ENGINE__MAX_LORAS
  value: {{ $v.maxLoras | int | quote }}
- name: FEDPERSONA_ENGINE__MAX_CPU_LORAS
  value: {{ $v.maxCpuLoras | int | quote }}
- name: FEDPERSONA_ENGINE__MAX_LORA_RANK
  value: {{ $v.maxLoraRank | int | quote }}
- name: FEDPERSONA_ENGINE__MAX_MODEL_LEN
  value: {{ $v.maxModelLen | int | quote }}
- name: FEDPERSONA_ENGINE__DTYPE
  value: {{ $v.dtype | quote }}
- name: FEDPERSONA_ENGINE__KV_CACHE_GIB
  value: {{ $v.cpuKvCacheGiB | int | quote }}
- name: FEDPERSONA_ENGINE__EXTRA_ARGS
  value: {{ include "fedpersona.vllmExtraArgs" . | quote }}
{{- if .Values.proxyTuning.enabled }}
- name: FEDPERSONA_ENGINE__PROXY_SMALL_MODEL
  value: {{ include "fedpersona.smallModelDir" . | quote }}
- name: FEDPERSONA_ENGINE__PROXY_PROCESSOR
  value: {{ .Values.proxyTuning.processor | quote }}
{{- end }}
{{- end }}

{{/* Cross-value checks; included once from every workload template. */}}
{{- define "fedpersona.validate" -}}
{{- $owned := list "--model" "--served-model-name" "--host" "--port" "--enable-lora" "--max-loras" "--max-cpu-loras" "--max-lora-rank" "--max-model-len" "--dtype" "--logits-processors" "--lora-modules" "--gpu-memory-utilization" "--tensor-parallel-size" }}
{{- range .Values.vllm.extraArgs }}
{{- if has (regexReplaceAll "=.*$" . "") $owned }}
{{- fail (printf "vllm.extraArgs may not set %s: the chart sets it from its own values" .) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.vllm.maxCpuLoras) (int .Values.vllm.maxLoras) }}
{{- fail "vllm.maxCpuLoras must be >= vllm.maxLoras (vLLM refuses otherwise)" }}
{{- end }}
{{- if le (int .Values.vllm.terminationGracePeriodSeconds) (int .Values.vllm.drainSeconds) }}
{{- fail "vllm.terminationGracePeriodSeconds must be greater than vllm.drainSeconds" }}
{{- end }}
{{- if le (int .Values.gateway.terminationGracePeriodSeconds) (add (int .Values.gateway.shutdownGraceSeconds) (int .Values.gateway.preStopSleepSeconds) | int) }}
{{- fail "gateway.terminationGracePeriodSeconds must be greater than gateway.shutdownGraceSeconds + gateway.preStopSleepSeconds" }}
{{- end }}
{{- if and (not .Values.vllm.enabled) (not .Values.vllm.externalUrl) }}
{{- fail "vllm.externalUrl is required when vllm.enabled is false" }}
{{- end }}
{{- if and .Values.model.init.enabled (not .Values.model.init.copyFrom) (not .Values.model.init.command) }}
{{- fail "model.init.enabled needs model.init.copyFrom or model.init.command" }}
{{- end }}
{{- $sl := .Values.trainer.superlink }}
{{- $owned := list "--insecure" "--enable-supernode-auth" "--ssl-ca-certfile" "--ssl-certfile" "--ssl-keyfile" "--auth-list-public-keys" }}
{{- range $sl.extraArgs }}
{{- if has (regexReplaceAll "=.*$" . "") $owned }}
{{- fail (printf "trainer.superlink.extraArgs may not set %s: TLS and SuperNode authentication come from trainer.superlink.tls/auth (or dangerouslyInsecure)" .) }}
{{- end }}
{{- end }}
{{- if and $sl.dangerouslyInsecure (or $sl.tls.existingSecret $sl.tls.hosts $sl.auth.nodeBindings $sl.auth.existingBindingsSecret) }}
{{- fail "trainer.superlink.dangerouslyInsecure turns TLS and SuperNode authentication off: it cannot be combined with trainer.superlink.tls or trainer.superlink.auth settings" }}
{{- end }}
{{- if and $sl.auth.nodeBindings $sl.auth.existingBindingsSecret }}
{{- fail "trainer.superlink.auth: set nodeBindings or existingBindingsSecret, not both" }}
{{- end }}
{{- if and .Values.roundSchedule.enabled (not .Values.trainer.enabled) }}
{{- fail "roundSchedule.enabled needs trainer.enabled" }}
{{- end }}
{{- /* Mirrors fedpersona.service.settings: production refuses a short admin key (MIN_ADMIN_KEY_LENGTH). */}}
{{- $key := .Values.auth.adminKey }}
{{- if and $key (not .Values.auth.existingSecret) (eq .Values.gateway.environment "production") (lt (len $key) 24) }}
{{- fail "auth.adminKey must be at least 24 characters in production (leave it empty to generate one)" }}
{{- end }}
{{- $pdb := .Values.gateway.podDisruptionBudget }}
{{- if and $pdb.enabled (hasKey $pdb "minAvailable") (hasKey $pdb "maxUnavailable") }}
{{- fail "gateway.podDisruptionBudget: set minAvailable or maxUnavailable, not both" }}
{{- end }}
{{- end }}

{{/* Volumes every workload mounts: the home volume and a writable /tmp. */}}
{{- define "fedpersona.homeVolume" -}}
- name: home
  persistentVolumeClaim:
    claimName: {{ include "fedpersona.homeClaimName" . }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "fedpersona.homeVolumeMounts" -}}
- name: home
  mountPath: {{ .Values.persistence.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The admin key as an env var read from its Secret (never inlined). */}}
{{- define "fedpersona.adminKeyEnv" -}}
- name: FEDPERSONA_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "fedpersona.adminSecretName" . }}
      key: {{ include "fedpersona.adminSecretKey" . }}
{{- end }}

{{/*
The vLLM server's environment. Same variables and values as fedpersona.service.engine.config.engine_env
(tests/helm compares the two), plus cache locations on a writable volume.
*/}}
{{- define "fedpersona.vllmEnv" -}}
# vLLM's API key, read by its own check and by the fedpersona guard (never on the command line).
- name: VLLM_API_KEY
  {{- include "fedpersona.engineKeyRef" . | nindent 2 }}
- name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
  value: "True"
- name: VLLM_CPU_KVCACHE_SPACE
  value: {{ .Values.vllm.cpuKvCacheGiB | int | quote }}
# An allow-list naming no plugin: vLLM's LoRA resolver plugins would load adapters by a
# client-supplied name; only the gateway decides which adapter is served.
- name: VLLM_PLUGINS
  value: ""
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- if .Values.proxyTuning.enabled }}
- name: FEDPERSONA_PROXY_SMALL_MODEL
  value: {{ include "fedpersona.smallModelDir" . | quote }}
- name: FEDPERSONA_STORE_DIR
  value: {{ include "fedpersona.storeDir" . | quote }}
{{- end }}
{{- end }}

{{/* The trainer container's `fedpersona` arguments: the round controller API. */}}
{{- define "fedpersona.trainerArgs" -}}
{{- $t := .Values.trainer -}}
- trainer
- --home
- {{ .Values.persistence.mountPath | quote }}
- --host
- "0.0.0.0"
- --port
- {{ $t.apiPort | int | quote }}
- --engine
- {{ $t.engine | quote }}
- --superlink-host
- localhost
- --control-port
- {{ $t.superlink.controlPort | int | quote }}
{{- if $t.superlink.dangerouslyInsecure }}
- --insecure-superlink
{{- else }}
- --root-certificates
- {{ printf "%s/ca.crt" (include "fedpersona.superlinkTlsDir" .) | quote }}
- --node-bindings
- {{ include "fedpersona.nodeBindingsFile" . | quote }}
{{- end }}
{{- range $t.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The superlink container's `flower-superlink` arguments. */}}
{{- define "fedpersona.superlinkArgs" -}}
{{- $sl := .Values.trainer.superlink -}}
- --fleet-api-address
- {{ printf "0.0.0.0:%d" (int $sl.fleetPort) | quote }}
- --control-api-address
- {{ printf "0.0.0.0:%d" (int $sl.controlPort) | quote }}
- --serverappio-api-address
- {{ printf "127.0.0.1:%d" (int $sl.serverAppIoPort) | quote }}
- --health-server-address
- {{ printf "0.0.0.0:%d" (int $sl.healthPort) | quote }}
{{- if $sl.persistState }}
- --database
- {{ printf "%s/superlink.db" (trimSuffix "/" .Values.persistence.mountPath) | quote }}
{{- end }}
{{- if $sl.dangerouslyInsecure }}
- --insecure
{{- else }}
{{- $dir := include "fedpersona.superlinkTlsDir" . }}
- --enable-supernode-auth
- --ssl-ca-certfile
- {{ printf "%s/ca.crt" $dir | quote }}
- --ssl-certfile
- {{ printf "%s/tls.crt" $dir | quote }}
- --ssl-keyfile
- {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- range $sl.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Where rounds are started: the trainer's round controller API. */}}
{{- define "fedpersona.roundsUrl" -}}
{{- printf "http://%s:%d/admin/rounds" (include "fedpersona.trainerServiceName" .) (int .Values.trainer.apiPort) }}
{{- end }}
