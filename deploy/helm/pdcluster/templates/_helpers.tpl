{{- define "pdcluster.fullname" -}}
{{- printf "%s" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdcluster.labels" -}}
app.kubernetes.io/name: pdcluster
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pdcluster.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "pdcluster.redisURL" -}}
{{- if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else -}}
{{ printf "redis://%s-redis:6379/0" (include "pdcluster.fullname" .) }}
{{- end -}}
{{- end -}}

{{/* Environment every pdcluster container gets: the KV token and the API key from Secrets. */}}
{{- define "pdcluster.env" -}}
- name: RAY_AUTH_MODE
  value: disabled
{{- if .Values.kvToken.existingSecret }}
- name: PDCLUSTER_KV_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.kvToken.existingSecret }}, key: token}
{{- end }}
{{- if .Values.apiKey.existingSecret }}
- name: PDCLUSTER_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.apiKey.existingSecret }}, key: {{ .Values.apiKey.secretKey }}}
{{- end }}
{{- end -}}

{{- define "pdcluster.volumeMounts" -}}
- {name: config, mountPath: /etc/pdcluster/config, readOnly: true}
{{- if .Values.model.volume }}
- {name: model, mountPath: {{ .Values.model.path | dir }}, readOnly: true}
{{- end }}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/pdcluster/tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "pdcluster.volumes" -}}
- name: config
  configMap: {name: {{ include "pdcluster.fullname" . }}-spec}
{{- if .Values.model.volume }}
- name: model
{{ toYaml .Values.model.volume | indent 2 }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret: {secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}}
{{- end }}
{{- end -}}

{{- define "pdcluster.kvTierPath" -}}
/var/lib/pdcluster/kv-tier
{{- end -}}

{{- define "pdcluster.tlsArgs" -}}
{{- if .Values.tls.enabled -}}
["--tls-cert", "/etc/pdcluster/tls/tls.crt", "--tls-key", "/etc/pdcluster/tls/tls.key", "--tls-ca", "/etc/pdcluster/tls/ca.crt"]
{{- else -}}
[]
{{- end -}}
{{- end -}}
