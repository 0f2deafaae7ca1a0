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
