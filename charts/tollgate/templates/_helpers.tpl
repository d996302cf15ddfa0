{{/* Names and labels. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.fullname" -}}
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

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tollgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tollgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fixed paths inside the container. */}}
{{- define "tollgate.configDir" -}}/etc/tollgate/config{{- end }}
{{- define "tollgate.catalogDir" -}}/etc/tollgate/catalog{{- end }}
{{- define "tollgate.meteringDir" -}}/var/lib/tollgate{{- end }}
{{- define "tollgate.grpcTlsDir" -}}/etc/tollgate/tls/grpc{{- end }}
{{- define "tollgate.adminTlsDir" -}}/etc/tollgate/tls/admin{{- end }}
{{- define "tollgate.catalogCaDir" -}}/etc/tollgate/catalog-ca{{- end }}

{{/* mTLS on the gRPC port: Envoy's client certificate authenticates it (a name for yes, empty for no). */}}
{{- define "tollgate.grpcMtls" -}}
{{- if and .Values.tls.grpc.enabled .Values.tls.grpc.mtls }}true{{- end }}
{{- end }}
{{- define "tollgate.probeScheme" -}}{{ ternary "HTTPS" "HTTP" (eq (toString .Values.tls.admin.enabled) "true") }}{{- end }}

{{/* Billing is on when config.billing carries anything (an empty map means "absent" in the contract). */}}
{{- define "tollgate.billingOn" -}}
{{- if and (not .Values.existingConfig.configMap) (not .Values.existingConfig.secret) .Values.config.billing }}true{{- end }}
{{- end }}

{{- define "tollgate.redisOn" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{- end }}
{{- end }}

{{/* The Secret of generated tokens, and whether each token comes from it (a name for yes, empty for no). */}}
{{- define "tollgate.tokensSecretName" -}}{{ include "tollgate.fullname" . }}-tokens{{- end }}
{{- define "tollgate.generatedAdminToken" -}}
{{- if and .Values.secrets.generate (not .Values.secrets.adminToken.name) }}true{{ end }}
{{- end }}
{{- define "tollgate.generatedAccessLogToken" -}}
{{- if and .Values.secrets.generate (eq .Values.mode "service") (not .Values.secrets.accessLogToken.name) }}true{{ end }}
{{- end }}

{{- define "tollgate.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecret }}{{- else }}{{ include "tollgate.fullname" . }}-redis{{- end }}
{{- end }}

{{- define "tollgate.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{- else }}TOLLGATE_REDIS_URL{{- end }}
{{- end }}

{{/* The state store's URL comes from a Secret: the one named in state.existingSecret, or the chart's own holding state.url. */}}
{{- define "tollgate.stateUrlOn" -}}
{{- if or .Values.state.url .Values.state.existingSecret }}true{{- end }}
{{- end }}

{{- define "tollgate.stateSecretName" -}}
{{- if .Values.state.existingSecret }}{{ .Values.state.existingSecret }}{{- else }}{{ include "tollgate.fullname" . }}-state{{- end }}
{{- end }}

{{- define "tollgate.stateSecretKey" -}}
{{- if .Values.state.existingSecret }}{{ .Values.state.existingSecretKey }}{{- else }}TOLLGATE_STATE_URL{{- end }}
{{- end }}

{{/*
The generated config's state store is SQLite (a name for yes, empty for no): no URL (tollgate's default,
sqlite://<metering.dir>/state.db) or a state.url starting with sqlite:. A URL in state.existingSecret is not
visible to the chart and counts as shared (Postgres).
*/}}
{{- define "tollgate.stateSqlite" -}}
{{- if and (include "tollgate.configGenerated" .) (not .Values.state.existingSecret) (or (not .Values.state.url) (hasPrefix "sqlite:" .Values.state.url)) }}true{{- end }}
{{- end }}

{{/* tollgate fetches the catalog itself from catalog.remote.url (a name for yes, empty for no). */}}
{{- define "tollgate.catalogRemote" -}}
{{- if .Values.catalog.remote.url }}true{{- end }}
{{- end }}

{{/* The remote catalog's private CA comes from a ConfigMap or a Secret (a name for yes, empty for no). */}}
{{- define "tollgate.catalogCa" -}}
{{- if and (include "tollgate.catalogRemote" .) (or .Values.catalog.remote.caConfigMap .Values.catalog.remote.caSecret) }}true{{- end }}
{{- end }}

{{/* NOTES.txt's lines on a remote catalog (the URL without its query, which may hold a token). */}}
{{- define "tollgate.catalogRemoteNote" -}}
The catalog is fetched from {{ regexReplaceAll "[?#].*$" .Values.catalog.remote.url "" }} every {{ .Values.catalog.remote.pollInterval }}
(catalog.remote); a failed or invalid fetch keeps the last good one, cached in {{ include "tollgate.meteringDir" . }}.
{{- if .Values.persistence.enabled }}
The cache is on the spool claim: a pod restarted while the remote is down still serves.
{{- else }}
The cache is on the spool's emptyDir: a new pod that cannot reach the remote exits until it can
(persistence.enabled keeps the cache across pod restarts).
{{- end }}
{{- end }}

{{/* catalog.inline holds something (a product, a developer, any other key with content). */}}
{{- define "tollgate.catalogInlineSet" -}}
{{- range $key, $val := .Values.catalog.inline }}{{ if $val }}true{{ end }}{{ end }}
{{- end }}

{{/* The chart renders and mounts the catalog ConfigMap: no existing ConfigMap/Secret and no remote URL. */}}
{{- define "tollgate.catalogGenerated" -}}
{{- if and (not .Values.catalog.existingConfigMap) (not .Values.catalog.existingSecret) (not (include "tollgate.catalogRemote" .)) }}true{{- end }}
{{- end }}

{{- define "tollgate.configGenerated" -}}
{{- if and (not .Values.existingConfig.configMap) (not .Values.existingConfig.secret) }}true{{- end }}
{{- end }}

{{- define "tollgate.claimName" -}}
{{- if .Values.persistence.existingClaim }}{{ .Values.persistence.existingClaim }}{{- else }}{{ include "tollgate.fullname" . }}-spool{{- end }}
{{- end }}

{{/* The StatefulSet owns its claims through volumeClaimTemplates; otherwise the chart creates one claim. */}}
{{- define "tollgate.perPodClaims" -}}
{{- if and (eq .Values.mode "service") (eq .Values.kind "StatefulSet") .Values.persistence.enabled (not .Values.persistence.existingClaim) }}true{{- end }}
{{- end }}

{{/*
Refuses value combinations that would install but misbehave. Included from every template that depends on
them, so `helm template` and `helm install` fail with one clear sentence.
*/}}
{{- define "tollgate.validate" -}}
{{- $v := .Values }}
{{- if and $v.existingConfig.configMap $v.existingConfig.secret }}
{{- fail "existingConfig: set configMap or secret, not both" }}
{{- end }}
{{- if and $v.catalog.existingConfigMap $v.catalog.existingSecret }}
{{- fail "catalog: set existingConfigMap or existingSecret, not both" }}
{{- end }}
{{- $remote := $v.catalog.remote }}
{{- if $remote.url }}
{{- if or $v.catalog.existingConfigMap $v.catalog.existingSecret }}
{{- fail "catalog.remote.url is set, so tollgate fetches the catalog itself: leave catalog.existingConfigMap and catalog.existingSecret empty" }}
{{- end }}
{{- if include "tollgate.catalogInlineSet" . }}
{{- fail "catalog.remote.url is set, so tollgate fetches the catalog itself: leave catalog.inline empty (products: [], developers: [])" }}
{{- end }}
{{- if not (regexMatch "^(?i)https://" $remote.url) }}
{{- fail "catalog.remote.url must be an https:// URL: the catalog holds every key's hash, so tollgate fetches it over HTTPS only" }}
{{- end }}
{{- if regexMatch "^(?i)https://[^/?#]*@" $remote.url }}
{{- fail "catalog.remote.url must not carry credentials: put the token in a Secret and name it in catalog.remote.tokenSecret.name" }}
{{- end }}
{{- if and $remote.caConfigMap $remote.caSecret }}
{{- fail "catalog.remote: set caConfigMap or caSecret, not both" }}
{{- end }}
{{- else if or $remote.tokenSecret.name $remote.caConfigMap $remote.caSecret }}
{{- fail "catalog.remote.tokenSecret, caConfigMap and caSecret apply only to a remote catalog: set catalog.remote.url, or leave them empty" }}
{{- end }}
{{- if and $v.redis.url $v.redis.existingSecret }}
{{- fail "redis: set url or existingSecret, not both" }}
{{- end }}
{{- if and $v.state.url $v.state.existingSecret }}
{{- fail "state: set url or existingSecret, not both" }}
{{- end }}
{{- if include "tollgate.configGenerated" . }}
{{- $store := default "memory" $v.config.quota.store }}
{{- if and (eq $store "redis") (not (include "tollgate.redisOn" .)) }}
{{- fail "config.quota.store is redis: set redis.url or redis.existingSecret" }}
{{- end }}
{{- if and (eq $store "memory") (include "tollgate.redisOn" .) }}
{{- fail "redis is configured but config.quota.store is memory: set config.quota.store to redis" }}
{{- end }}
{{- /* Both refusals below when both apply, in one sentence: one install attempt names everything to change. */}}
{{- if and (eq $store "memory") (eq $v.mode "service") (or $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) }}
{{- if include "tollgate.stateSqlite" . }}
{{- fail "config.quota.store memory counts quota per pod and the state store is SQLite, one file per pod, and this release runs more than one pod: use quota.store redis and set state.existingSecret (or state.url) to a shared postgres:// URL, or replicaCount 1 without autoscaling" }}
{{- end }}
{{- fail "config.quota.store memory counts quota per pod, and this release runs more than one pod: use quota.store redis, or replicaCount 1 without autoscaling" }}
{{- end }}
{{- if and (include "tollgate.stateSqlite" .) (eq $v.mode "service") (or $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) }}
{{- fail "the state store is SQLite, one file per pod, and this release runs more than one pod: set state.existingSecret (or state.url) to a shared postgres:// URL, or run replicaCount 1 without autoscaling" }}
{{- end }}
{{- if and (eq $store "memory") $v.config.quota.redis_cluster }}
{{- fail "config.quota.redis_cluster is true but config.quota.store is memory: set config.quota.store to redis" }}
{{- end }}
{{- $producer := toString (default "" $v.config.metering.producer) }}
{{- if and $producer (not (contains "${" $producer)) (or (eq $v.mode "sidecar") $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) }}
{{- fail "config.metering.producer is one fixed name for several tollgates, whose billing identifiers would then collide at Stripe: leave it unset (each spool then keeps its own random id) or use a ${VAR} that differs per pod" }}
{{- end }}
{{- if not $v.config.insecure_listeners }}
{{- if not (or $v.secrets.adminToken.name $v.secrets.generate) }}
{{- fail "the admin port listens on the pod IP and tollgate refuses it without a token: set secrets.adminToken.name, or secrets.generate: true, or config.insecure_listeners: true" }}
{{- end }}
{{- if and (eq $v.mode "service") (not (or $v.secrets.accessLogToken.name $v.secrets.generate (include "tollgate.grpcMtls" .))) }}
{{- fail "in service mode the gRPC port listens on the pod IP and tollgate refuses it without an access-log token or mTLS: set secrets.accessLogToken.name, or secrets.generate: true, or tls.grpc with mtls, or config.insecure_listeners: true" }}
{{- end }}
{{- end }}
{{- if and (include "tollgate.billingOn" .) (not $v.secrets.stripeApiKey.name) }}
{{- fail "config.billing is set: name the Secret holding the Stripe API key in secrets.stripeApiKey.name" }}
{{- end }}
{{- end }}
{{- if and (eq $v.mode "service") (eq $v.kind "Deployment") $v.persistence.enabled (or $v.autoscaling.enabled (gt (int $v.replicaCount) 1)) }}
{{- fail "persistence with kind Deployment is one claim that only one pod may own (two tollgates must never share a spool): set replicaCount 1 and autoscaling off, or use kind StatefulSet for a claim per pod" }}
{{- end }}
{{- if and (eq $v.kind "StatefulSet") $v.persistence.existingClaim }}
{{- fail "persistence.existingClaim is one claim: it cannot serve a StatefulSet's pods; drop it to get a claim per pod" }}
{{- end }}
{{- range $name, $listener := $v.tls }}
{{- if and $listener.enabled (not $listener.secretName) }}
{{- fail (printf "tls.%s.enabled is true: name its kubernetes.io/tls Secret in tls.%s.secretName" $name $name) }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* The generated tollgate config file (contract section 2). */}}
{{- define "tollgate.config" -}}
{{- $v := .Values }}
{{- $cfg := deepCopy $v.config }}
{{- $bind := ternary "0.0.0.0" "127.0.0.1" (eq $v.mode "service") }}
{{- $_ := set $cfg "grpc_listen" (printf "%s:%d" $bind (int $v.ports.grpc)) }}
{{- /* The admin port serves the kubelet's probes and Prometheus, which reach the pod IP in both modes. */}}
{{- $_ := set $cfg "admin_listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) }}
{{- $_ := set $cfg "admin_token" "${TOLLGATE_ADMIN_TOKEN:-}" }}
{{- $_ := set $cfg "access_log_token" "${TOLLGATE_ACCESS_LOG_TOKEN:-}" }}
{{- if include "tollgate.catalogRemote" . }}
{{- /* Fetched over HTTPS and cached in metering.dir (contract section 12); the token stays in the pod's env. */}}
{{- $remote := $v.catalog.remote }}
{{- $catalog := dict "url" $remote.url "poll_interval" $remote.pollInterval "timeout" $remote.timeout }}
{{- if $remote.tokenSecret.name }}
{{- $_ := set $catalog "headers" (dict "authorization" "Bearer ${TOLLGATE_CATALOG_TOKEN}") }}
{{- end }}
{{- if include "tollgate.catalogCa" . }}
{{- $_ := set $catalog "ca_path" (printf "%s/ca.crt" (include "tollgate.catalogCaDir" .)) }}
{{- end }}
{{- $_ := set $cfg "catalog" $catalog }}
{{- else }}
{{- $_ := set $cfg "catalog" (dict "path" (printf "%s/catalog.yaml" (include "tollgate.catalogDir" .))) }}
{{- end }}
{{- $metering := default (dict) $cfg.metering }}
{{- $_ := set $metering "dir" (include "tollgate.meteringDir" .) }}
{{- $_ := set $cfg "metering" $metering }}
{{- $quota := default (dict) $cfg.quota }}
{{- if eq (default "memory" $quota.store) "redis" }}
{{- $_ := set $quota "redis_url" "${TOLLGATE_REDIS_URL}" }}
{{- end }}
{{- $_ := set $cfg "quota" $quota }}
{{- /* Without a URL tollgate keeps its state in SQLite under metering.dir (one pod only, see tollgate.validate). */}}
{{- $state := dict "sync_interval" $v.state.syncInterval }}
{{- if include "tollgate.stateUrlOn" . }}
{{- $_ := set $state "url" "${TOLLGATE_STATE_URL}" }}
{{- end }}
{{- $_ := set $cfg "state" $state }}
{{- if $cfg.billing }}
{{- $stripe := default (dict) $cfg.billing.stripe }}
{{- $_ := set $stripe "api_key" "${STRIPE_API_KEY}" }}
{{- if $v.secrets.stripeWebhookSecret.name }}
{{- $_ := set $stripe "webhook_secret" "${STRIPE_WEBHOOK_SECRET}" }}
{{- end }}
{{- $_ := set $cfg.billing "stripe" $stripe }}
{{- else }}
{{- $_ := unset $cfg "billing" }}
{{- end }}
{{- if $v.tls.grpc.enabled }}
{{- $dir := include "tollgate.grpcTlsDir" . }}
{{- $grpcTls := dict "cert_path" (printf "%s/tls.crt" $dir) "key_path" (printf "%s/tls.key" $dir) }}
{{- if $v.tls.grpc.mtls }}
{{- $_ := set $grpcTls "client_ca_path" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $cfg "grpc_tls" $grpcTls }}
{{- end }}
{{- if $v.tls.admin.enabled }}
{{- $dir := include "tollgate.adminTlsDir" . }}
{{- $_ := set $cfg "admin_tls" (dict "cert_path" (printf "%s/tls.crt" $dir) "key_path" (printf "%s/tls.key" $dir)) }}
{{- end }}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $v.extraConfig) }}
{{- toYaml $cfg }}
{{- end }}

{{/* The container's environment: Secrets the config references as ${VAR}, then plain variables. */}}
{{- define "tollgate.env" -}}
{{- $v := .Values }}
{{- if $v.secrets.stripeApiKey.name }}
- name: STRIPE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.stripeApiKey.name }}
      key: {{ $v.secrets.stripeApiKey.key }}
{{- end }}
{{- if and $v.secrets.stripeWebhookSecret.name (include "tollgate.billingOn" .) }}
- name: STRIPE_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.stripeWebhookSecret.name }}
      key: {{ $v.secrets.stripeWebhookSecret.key }}
{{- end }}
{{- if $v.secrets.adminToken.name }}
- name: TOLLGATE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.adminToken.name }}
      key: {{ $v.secrets.adminToken.key }}
{{- else if include "tollgate.generatedAdminToken" . }}
- name: TOLLGATE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.tokensSecretName" . }}
      key: TOLLGATE_ADMIN_TOKEN
{{- end }}
{{- if $v.secrets.accessLogToken.name }}
- name: TOLLGATE_ACCESS_LOG_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.accessLogToken.name }}
      key: {{ $v.secrets.accessLogToken.key }}
{{- else if include "tollgate.generatedAccessLogToken" . }}
- name: TOLLGATE_ACCESS_LOG_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.tokensSecretName" . }}
      key: TOLLGATE_ACCESS_LOG_TOKEN
{{- end }}
{{- if include "tollgate.redisOn" . }}
- name: TOLLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.redisSecretName" . }}
      key: {{ include "tollgate.redisSecretKey" . }}
{{- end }}
{{- if include "tollgate.stateUrlOn" . }}
- name: TOLLGATE_STATE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.stateSecretName" . }}
      key: {{ include "tollgate.stateSecretKey" . }}
{{- end }}
{{- if and (include "tollgate.catalogRemote" .) $v.catalog.remote.tokenSecret.name }}
- name: TOLLGATE_CATALOG_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.catalog.remote.tokenSecret.name }}
      key: {{ $v.catalog.remote.tokenSecret.key }}
{{- end }}
{{- range $name, $ref := $v.secretEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- with $v.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The tollgate container, shared by the Deployment, the StatefulSet and the sidecar snippet in NOTES.txt. */}}
{{- define "tollgate.container" -}}
{{- $v := .Values }}
name: tollgate
image: {{ include "tollgate.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - serve
  - --config
  - {{ printf "%s/%s" (include "tollgate.configDir" .) (ternary "config.yaml" $v.existingConfig.key (eq (include "tollgate.configGenerated" .) "true")) }}
# Prefixed: port names must be unique in a pod, and an Envoy pod often has its own "admin".
ports:
  - name: tollgate-grpc
    containerPort: {{ $v.ports.grpc }}
    protocol: TCP
  - name: tollgate-admin
    containerPort: {{ $v.ports.admin }}
    protocol: TCP
{{- $env := include "tollgate.env" . | trim }}
{{- if $env }}
env:
  {{- $env | nindent 2 }}
{{- end }}
{{- /* The kubelet's gRPC probe speaks clear text only: with gRPC TLS the admin port is probed instead. */}}
{{- if and (eq $v.mode "service") (not $v.tls.grpc.enabled) }}
startupProbe:
  grpc:
    port: {{ $v.ports.grpc }}
    service: ""
  periodSeconds: {{ $v.probes.startup.periodSeconds }}
  timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
  failureThreshold: {{ $v.probes.startup.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ $v.ports.grpc }}
    service: ""
  periodSeconds: {{ $v.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ $v.probes.liveness.failureThreshold }}
{{- else }}
startupProbe:
  httpGet:
    path: /readyz
    port: tollgate-admin
    scheme: {{ include "tollgate.probeScheme" . }}
  periodSeconds: {{ $v.probes.startup.periodSeconds }}
  timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
  failureThreshold: {{ $v.probes.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /healthz
    port: tollgate-admin
    scheme: {{ include "tollgate.probeScheme" . }}
  periodSeconds: {{ $v.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ $v.probes.liveness.failureThreshold }}
{{- end }}
readinessProbe:
  httpGet:
    path: /readyz
    port: tollgate-admin
    scheme: {{ include "tollgate.probeScheme" . }}
  periodSeconds: {{ $v.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ $v.probes.readiness.failureThreshold }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: tollgate-config
    mountPath: {{ include "tollgate.configDir" . }}
    readOnly: true
{{- /* A remote catalog is fetched by tollgate: no catalog folder, maybe its private CA. */}}
{{- if not (include "tollgate.catalogRemote" .) }}
  - name: tollgate-catalog
    mountPath: {{ include "tollgate.catalogDir" . }}
    readOnly: true
{{- end }}
{{- if include "tollgate.catalogCa" . }}
  - name: tollgate-catalog-ca
    mountPath: {{ include "tollgate.catalogCaDir" . }}
    readOnly: true
{{- end }}
  - name: tollgate-spool
    mountPath: {{ include "tollgate.meteringDir" . }}
  - name: tollgate-tmp
    mountPath: /tmp
{{- if $v.tls.grpc.enabled }}
  - name: tollgate-grpc-tls
    mountPath: {{ include "tollgate.grpcTlsDir" . }}
    readOnly: true
{{- end }}
{{- if $v.tls.admin.enabled }}
  - name: tollgate-admin-tls
    mountPath: {{ include "tollgate.adminTlsDir" . }}
    readOnly: true
{{- end }}
{{- with $v.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The pod's volumes, prefixed so they cannot collide with an Envoy pod's own; the spool is left out when a StatefulSet claims one per pod. */}}
{{- define "tollgate.volumes" -}}
{{- $v := .Values }}
- name: tollgate-config
  {{- if $v.existingConfig.secret }}
  secret:
    secretName: {{ $v.existingConfig.secret }}
  {{- else }}
  configMap:
    name: {{ default (printf "%s-config" (include "tollgate.fullname" .)) $v.existingConfig.configMap }}
  {{- end }}
{{- if not (include "tollgate.catalogRemote" .) }}
- name: tollgate-catalog
  {{- if $v.catalog.existingSecret }}
  secret:
    secretName: {{ $v.catalog.existingSecret }}
    items:
      - key: {{ $v.catalog.key }}
        path: catalog.yaml
  {{- else if $v.catalog.existingConfigMap }}
  configMap:
    name: {{ $v.catalog.existingConfigMap }}
    items:
      - key: {{ $v.catalog.key }}
        path: catalog.yaml
  {{- else }}
  configMap:
    name: {{ include "tollgate.fullname" . }}-catalog
  {{- end }}
{{- end }}
{{- if include "tollgate.catalogCa" . }}
- name: tollgate-catalog-ca
  {{- if $v.catalog.remote.caSecret }}
  secret:
    secretName: {{ $v.catalog.remote.caSecret }}
  {{- else }}
  configMap:
    name: {{ $v.catalog.remote.caConfigMap }}
  {{- end }}
    items:
      - key: {{ $v.catalog.remote.caKey }}
        path: ca.crt
{{- end }}
{{- if not (include "tollgate.perPodClaims" .) }}
- name: tollgate-spool
  {{- if $v.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "tollgate.claimName" . }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $v.persistence.emptyDirSizeLimit }}
  {{- end }}
{{- end }}
- name: tollgate-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if $v.tls.grpc.enabled }}
- name: tollgate-grpc-tls
  secret:
    secretName: {{ $v.tls.grpc.secretName }}
{{- end }}
{{- if $v.tls.admin.enabled }}
- name: tollgate-admin-tls
  secret:
    secretName: {{ $v.tls.admin.secretName }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pod template shared by the Deployment and the StatefulSet. */}}
{{- define "tollgate.podTemplate" -}}
{{- $v := .Values }}
metadata:
  labels:
    {{- include "tollgate.selectorLabels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- if include "tollgate.configGenerated" . }}
    {{- /* The config is read once at start (only the catalog is watched): roll the pods when it changes. */}}
    checksum/config: {{ include "tollgate.config" . | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "tollgate.serviceAccountName" . }}
  # tollgate never talks to the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - {{ include "tollgate.container" . | trim | indent 6 | trim }}
  volumes:
    {{- include "tollgate.volumes" . | trim | nindent 4 }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
