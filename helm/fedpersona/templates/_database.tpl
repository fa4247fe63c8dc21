{{/* The gateway's database (users, API-key hashes, tombstones, shared rate limits). ------------ */}}

{{- /* "postgresql" or "sqlite": database.type, where "auto" means PostgreSQL as soon as more than
one gateway can run (several replicas or autoscaling), because SQLite on a shared volume is not
safe across nodes and its rate limits are per gateway process. */}}
{{- define "fedpersona.databaseType" -}}
{{- $d := .Values.database }}
{{- if ne $d.type "auto" }}
{{- $d.type }}
{{- else if or (gt (int .Values.gateway.replicas) 1) .Values.gateway.autoscaling.enabled }}
{{- "postgresql" }}
{{- else }}
{{- "sqlite" }}
{{- end }}
{{- end }}

{{- /* "true" when the chart runs its own PostgreSQL (chosen, and no external URL Secret). */}}
{{- define "fedpersona.databaseBundled" -}}
{{- if and (eq (include "fedpersona.databaseType" .) "postgresql") (not .Values.database.external.existingSecret) }}
{{- "true" }}
{{- end }}
{{- end }}

{{- define "fedpersona.postgresName" -}}
{{- printf "%s-postgresql" (include "fedpersona.fullname" .) }}
{{- end }}

{{- define "fedpersona.databaseSecretName" -}}
{{- default (include "fedpersona.postgresName" .) .Values.database.external.existingSecret }}
{{- end }}

{{- define "fedpersona.databaseSecretKey" -}}
{{- ternary .Values.database.external.existingSecretKey "database-url" (ne .Values.database.external.existingSecret "") }}
{{- end }}

{{- /* Gateway environment: the URL only ever comes from a Secret. */}}
{{- define "fedpersona.databaseEnv" -}}
{{- $d := .Values.database }}
{{- if and (eq $d.type "sqlite") $d.external.existingSecret }}
{{- fail "database.external.existingSecret names a PostgreSQL URL, but database.type is sqlite" }}
{{- end }}
{{- if include "fedpersona.databaseBundled" . }}
{{- $g := .Values.gateway }}
{{- $gateways := ternary $g.autoscaling.maxReplicas $g.replicas $g.autoscaling.enabled | int }}
{{- /* Ten connections stay free for operators (psql) and the server's own reserve. */}}
{{- if gt (mul $gateways (int $d.poolSize)) (sub (int $d.bundled.maxConnections) 10) }}
{{- fail (printf "%d gateways x database.poolSize %d connections exceed database.bundled.maxConnections %d (minus 10 kept free): raise maxConnections or lower poolSize" $gateways (int $d.poolSize) (int $d.bundled.maxConnections)) }}
{{- end }}
{{- end }}
{{- if eq (include "fedpersona.databaseType" .) "postgresql" }}
- name: FEDPERSONA_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fedpersona.databaseSecretName" . }}
      key: {{ include "fedpersona.databaseSecretKey" . }}
- name: FEDPERSONA_DATABASE_POOL_SIZE
  value: {{ .Values.database.poolSize | int | quote }}
{{- end }}
- name: FEDPERSONA_RATE_LIMIT_SCOPE
  value: {{ .Values.gateway.rateLimit.scope | default "auto" | quote }}
{{- end }}
