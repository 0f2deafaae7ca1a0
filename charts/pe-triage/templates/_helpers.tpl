{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "pe-triage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "pe-triage.fullname" -}}
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

{{- define "pe-triage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pe-triage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pe-triage
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "mlflow"). */}}
{{- define "pe-triage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pe-triage.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pe-triage.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "pe-triage.cudaImage" -}}
{{ .Values.cudaImage.repository }}:{{ .Values.cudaImage.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "pe-triage.mlflow.fullname" -}}
{{ include "pe-triage.fullname" . | trunc 56 | trimSuffix "-" }}-mlflow
{{- end }}

{{- define "pe-triage.postgresql.fullname" -}}
{{ include "pe-triage.fullname" . | trunc 52 | trimSuffix "-" }}-postgresql
{{- end }}

{{- define "pe-triage.mlflow.serviceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create }}
{{- default (include "pe-triage.mlflow.fullname" .) .Values.mlflow.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.mlflow.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pe-triage.scheduler.serviceAccountName" -}}
{{- if .Values.schedule.serviceAccount.create }}
{{- default (printf "%s-scheduler" (include "pe-triage.fullname" . | trunc 53 | trimSuffix "-")) .Values.schedule.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.schedule.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* In-cluster URL of the MLflow tracking server. */}}
{{- define "pe-triage.mlflow.url" -}}
http://{{ include "pe-triage.mlflow.fullname" . }}.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.mlflow.service.port }}
{{- end }}

{{/* Name of the Secret with the pseudonymisation key. */}}
{{- define "pe-triage.pseudonymSecretName" -}}
{{- if .Values.pseudonymKey.create }}
{{- include "pe-triage.fullname" . }}-pseudonym
{{- else }}
{{- .Values.pseudonymKey.existingSecret }}
{{- end }}
{{- end }}

{{/* Name of the Secret with the S3 credentials (empty: none). */}}
{{- define "pe-triage.s3SecretName" -}}
{{- if .Values.s3.create }}
{{- include "pe-triage.fullname" . }}-s3
{{- else }}
{{- .Values.s3.existingSecret }}
{{- end }}
{{- end }}

{{- define "pe-triage.postgresql.secretName" -}}
{{- default (include "pe-triage.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{/* Password-less SQLAlchemy URI of a database on the bundled PostgreSQL (libpq reads PGPASSWORD). */}}
{{- define "pe-triage.postgresql.uri" -}}
postgresql+psycopg2://{{ .ctx.Values.postgresql.auth.username }}@{{ include "pe-triage.postgresql.fullname" .ctx }}.{{ .ctx.Release.Namespace }}.svc.cluster.local:5432/{{ .database }}
{{- end }}

{{/* S3 environment (endpoint, region, credentials from a Secret) of a container. */}}
{{- define "pe-triage.s3Env" -}}
{{- with .Values.s3.endpointUrl }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with include "pe-triage.s3SecretName" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* basic_auth.ini for the bundled PostgreSQL: users in its database mlflow_auth (password from
PGPASSWORD), admin password from MLFLOW_AUTH_ADMIN_PASSWORD; no secret value in the file. */}}
{{- define "pe-triage.mlflow.authIni" -}}
[mlflow]
default_permission = {{ .Values.mlflow.auth.defaultPermission }}
database_uri = {{ include "pe-triage.postgresql.uri" (dict "ctx" . "database" "mlflow_auth") }}
admin_username = {{ .Values.mlflow.auth.adminUsername }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
{{- end }}

{{/* The pod label that the MLflow NetworkPolicy admits (pe_triage_pipelines.cluster.MLFLOW_CLIENT_LABEL). */}}
{{- define "pe-triage.mlflow.clientLabel" -}}
pe-triage.io/mlflow-client
{{- end }}

{{/* Secret with the MLflow admin password and the Flask secret key (generated unless named). */}}
{{- define "pe-triage.mlflow.authSecretName" -}}
{{- default (printf "%s-auth" (include "pe-triage.mlflow.fullname" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{/* Secret with the pipeline user's MLFLOW_TRACKING_USERNAME/PASSWORD (generated unless named). */}}
{{- define "pe-triage.mlflow.clientSecretName" -}}
{{- default (printf "%s-client" (include "pe-triage.mlflow.fullname" .)) .Values.mlflow.auth.pipelineSecret }}
{{- end }}

{{- define "pe-triage.mlflow.usersName" -}}
{{ include "pe-triage.fullname" . | trunc 50 | trimSuffix "-" }}-mlflow-users
{{- end }}

{{/* A generated Secret value: the one already in the cluster (so upgrades keep it), else random.
Include with (dict "ctx" $ "name" SECRET "key" KEY "length" N); lookup is empty under `helm template`. */}}
{{- define "pe-triage.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (index $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum .length }}
{{- end }}
{{- end }}

{{/* Egress rule to DNS (networkPolicy.dnsTo; any address when empty). */}}
{{- define "pe-triage.dnsEgress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
  {{- with .Values.networkPolicy.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* ---- the triage service (inference) ---- */}}

{{- define "pe-triage.inference.fullname" -}}
{{ include "pe-triage.fullname" . | trunc 53 | trimSuffix "-" }}-inference
{{- end }}

{{/* The pod label the inference NetworkPolicy admits (callers of the triage service). */}}
{{- define "pe-triage.inference.clientLabel" -}}
pe-triage.io/triage-client
{{- end }}

{{- define "pe-triage.inference.serviceAccountName" -}}
{{- if .Values.inference.serviceAccount.create }}
{{- default (include "pe-triage.inference.fullname" .) .Values.inference.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.inference.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* models:/<name>@<alias>; the name defaults to config.registry.model_name, then the package's. */}}
{{- define "pe-triage.inference.modelUri" -}}
{{- $name := .Values.inference.model.name | default (dig "registry" "model_name" "" .Values.config) | default "pe-triage" }}
{{- printf "models:/%s@%s" $name .Values.inference.model.alias }}
{{- end }}

{{/* MLflow URL of the inference pods: inference.trackingUri, else this chart's server. */}}
{{- define "pe-triage.inference.trackingUri" -}}
{{- if .Values.inference.trackingUri }}
{{- .Values.inference.trackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- include "pe-triage.mlflow.url" . }}
{{- else }}
{{- fail "inference.enabled needs inference.trackingUri when mlflow.enabled is false" }}
{{- end }}
{{- end }}

{{/* config.serve.allowed_prefixes, comma-separated (PE_TRIAGE_ALLOWED_PREFIXES). */}}
{{- define "pe-triage.inference.allowedPrefixes" -}}
{{- dig "serve" "allowed_prefixes" (list) .Values.config | join "," }}
{{- end }}

{{/* "true" when the pods read the object store themselves: no artifact proxy, or s3:// inputs. */}}
{{- define "pe-triage.inference.needsS3" -}}
{{- $proxied := and .Values.mlflow.enabled .Values.mlflow.auth.enabled (not .Values.inference.trackingUri) }}
{{- $s3Inputs := false }}
{{- range include "pe-triage.inference.allowedPrefixes" . | splitList "," }}
{{- if hasPrefix "s3://" . }}{{ $s3Inputs = true }}{{ end }}
{{- end }}
{{- if or (not $proxied) $s3Inputs }}true{{ end }}
{{- end }}

{{/* The serving container of the Deployment and of the KServe predictor. Include with
(dict "ctx" $ "name" NAME "portName" PORT_NAME "probePort" PORT "startup" BOOL). */}}
{{- define "pe-triage.inference.container" -}}
{{- $ := .ctx }}
{{- $inf := $.Values.inference }}
{{- $resources := deepCopy $inf.resources }}
{{- if gt (int $inf.gpu.count) 0 }}
{{- $_ := set $resources "limits" (merge (dict $.Values.gpu.resource (int $inf.gpu.count)) (default dict $resources.limits)) }}
{{- end }}
- name: {{ .name }}
  image: {{ ternary (include "pe-triage.cudaImage" $) (include "pe-triage.image" $) (gt (int $inf.gpu.count) 0) | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command: ["pe-triage", "serve"]
  args:
    - --model
    - {{ include "pe-triage.inference.modelUri" $ | quote }}
    - --host
    - 0.0.0.0
    - --port
    - "8080"
    - --config
    - /etc/pe-triage/config.yaml
  env:
    - name: HOME
      value: /home/pe
    - name: TMPDIR
      value: /tmp
    - name: MLFLOW_TRACKING_URI
      value: {{ include "pe-triage.inference.trackingUri" $ | quote }}
    {{- with include "pe-triage.inference.mlflowSecret" $ | fromYaml }}
    - name: MLFLOW_TRACKING_USERNAME
      valueFrom:
        secretKeyRef: {name: {{ .name }}, key: {{ .usernameKey }}}
    - name: MLFLOW_TRACKING_PASSWORD
      valueFrom:
        secretKeyRef: {name: {{ .name }}, key: {{ .passwordKey }}}
    {{- end }}
    - name: PE_TRIAGE_ALLOWED_PREFIXES
      value: {{ include "pe-triage.inference.allowedPrefixes" $ | quote }}
    {{- if include "pe-triage.inference.needsS3" $ }}
    {{- with include "pe-triage.s3Env" $ | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- end }}
  ports:
    - name: {{ .portName }}
      containerPort: 8080
      protocol: TCP
  {{- if .startup }}
  # Loading downloads the model version and warms it (a minute or more): no liveness kill meanwhile.
  startupProbe:
    httpGet: {path: /health, port: {{ .probePort }}}
    periodSeconds: 10
    failureThreshold: {{ div $inf.startupSeconds 10 | max 1 }}
  {{- end }}
  # Ready only once the model is loaded and warmed; alive as long as the process answers.
  readinessProbe:
    httpGet: {path: /health, port: {{ .probePort }}}
    periodSeconds: 10
    timeoutSeconds: 5
  livenessProbe:
    httpGet: {path: /ping, port: {{ .probePort }}}
    periodSeconds: 20
    timeoutSeconds: 5
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $resources | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/pe-triage
      readOnly: true
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /home/pe/.cache
{{- end }}

{{/* The Secret with the MLflow credentials of the inference pods, as YAML {name, usernameKey,
passwordKey}; empty when there is none (an MLflow without auth). */}}
{{- define "pe-triage.inference.mlflowSecret" -}}
{{- $inf := .Values.inference }}
{{- if $inf.existingSecret }}
{{- dict "name" $inf.existingSecret "usernameKey" $inf.usernameKey "passwordKey" $inf.passwordKey | toYaml }}
{{- else if include "pe-triage.inference.createsUser" . }}
{{- dict "name" (include "pe-triage.inference.userSecretName" .) "usernameKey" $inf.usernameKey "passwordKey" $inf.passwordKey | toYaml }}
{{- end }}
{{- end }}

{{/* "true" when the chart makes the inference pods' MLflow user (and its Secret): the service or
the DICOM listener (which shares it) is on, uses this chart's MLflow with auth, and no Secret is named. */}}
{{- define "pe-triage.inference.createsUser" -}}
{{- $inf := .Values.inference }}
{{- if and (or $inf.enabled .Values.listener.enabled) .Values.mlflow.enabled .Values.mlflow.auth.enabled (not $inf.existingSecret) (not $inf.trackingUri) }}true{{ end }}
{{- end }}

{{- define "pe-triage.inference.userSecretName" -}}
{{ include "pe-triage.mlflow.fullname" . }}-inference
{{- end }}

{{/* Pod-level fields shared by the Deployment and the KServe predictor. */}}
{{- define "pe-triage.inference.podSpec" -}}
{{- $inf := .Values.inference }}
serviceAccountName: {{ include "pe-triage.inference.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  - name: config
    configMap:
      name: {{ include "pe-triage.fullname" . }}-config
  - name: tmp
    emptyDir: {sizeLimit: {{ $inf.tmpSizeLimit }}}
  - name: cache
    emptyDir: {sizeLimit: {{ $inf.cacheSizeLimit }}}
{{- $gpu := gt (int $inf.gpu.count) 0 }}
{{- with merge (dict) $inf.nodeSelector (ternary $inf.gpu.nodeSelector (dict) $gpu) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat $inf.tolerations (ternary $inf.gpu.tolerations (list) $gpu) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $inf.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- /* The claim of the training checkpoints: the existing one, the chart's own, or "" (none). */}}
{{- define "pe-triage.checkpointClaim" -}}
{{- if .Values.pods.checkpoints.existingClaim }}
{{- .Values.pods.checkpoints.existingClaim }}
{{- else if .Values.pods.checkpoints.create }}
{{- include "pe-triage.fullname" . }}-checkpoints
{{- end }}
{{- end }}
