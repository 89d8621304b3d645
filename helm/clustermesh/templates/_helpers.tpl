{{/* Chart name. */}}
{{- define "clustermesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name: the release name, or release-chart when they differ. */}}
{{- define "clustermesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "clustermesh.apiserver.fullname" -}}{{ include "clustermesh.fullname" . }}-apiserver{{- end -}}
{{- define "clustermesh.nodeSync.fullname" -}}{{ include "clustermesh.fullname" . }}-node-sync{{- end -}}
{{- define "clustermesh.certgen.fullname" -}}{{ include "clustermesh.fullname" . }}-certgen{{- end -}}

{{- define "clustermesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "clustermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clustermesh
clustermesh.io/cluster-name: {{ .Values.cluster.name | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "clustermesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clustermesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference: registry/repository:tag@digest. Call with (dict "root" . "image" .Values.image.apiserver). */}}
{{- define "clustermesh.image" -}}
{{- $reg := .root.Values.image.registry -}}
{{- $repo := .image.repository -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if $reg }}{{ $reg }}/{{ end }}{{ $repo }}:{{ $tag }}{{ if .image.digest }}@{{ .image.digest }}{{ end }}
{{- end -}}

{{- define "clustermesh.serviceAccountName.apiserver" -}}
{{- if .Values.serviceAccounts.apiserver.create -}}
{{- .Values.serviceAccounts.apiserver.name | default (include "clustermesh.apiserver.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccounts.apiserver.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "clustermesh.serviceAccountName.nodeSync" -}}
{{- if .Values.serviceAccounts.nodeSync.create -}}
{{- .Values.serviceAccounts.nodeSync.name | default (include "clustermesh.nodeSync.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccounts.nodeSync.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "clustermesh.serviceAccountName.certgen" -}}
{{- if .Values.serviceAccounts.certgen.create -}}
{{- .Values.serviceAccounts.certgen.name | default (include "clustermesh.certgen.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccounts.certgen.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Where the TLS files (a `clustermesh ca issue-cluster` directory) are mounted in every container. */}}
{{- define "clustermesh.tlsDir" -}}/etc/clustermesh/tls{{- end -}}
{{- define "clustermesh.remoteConfigDir" -}}/etc/clustermesh/remotes{{- end -}}
{{- define "clustermesh.remoteTlsDir" -}}/etc/clustermesh/remote-tls{{- end -}}

{{/* Names of the Secrets the Job creates or the user names. */}}
{{- define "clustermesh.secret.apiserver" -}}
{{- if eq .Values.certs.mode "existing" -}}
{{- required "certs.existing.apiserverSecret is required with certs.mode=existing" .Values.certs.existing.apiserverSecret -}}
{{- else -}}
{{- include "clustermesh.fullname" . }}-apiserver-tls
{{- end -}}
{{- end -}}

{{- define "clustermesh.secret.nodeSync" -}}
{{- if eq .Values.certs.mode "existing" -}}
{{- .Values.certs.existing.nodeSyncSecret | default .Values.certs.existing.apiserverSecret | required "certs.existing.nodeSyncSecret is required with certs.mode=existing" -}}
{{- else -}}
{{- include "clustermesh.fullname" . }}-node-sync-tls
{{- end -}}
{{- end -}}

{{/* The managed etcd's client trust: etcd.clientTrust, or by default cluster (mesh with certs.mode=certManager,
whose intermediate renews to a new certificate that etcd would only read at its next start). */}}
{{- define "clustermesh.etcdClientTrust" -}}
{{- if .Values.etcd.clientTrust -}}
{{- .Values.etcd.clientTrust -}}
{{- else if or (eq .Values.certs.mode "certManager") (ne .Values.etcd.mode "managed") -}}
mesh
{{- else -}}
cluster
{{- end -}}
{{- end -}}

{{- define "clustermesh.secret.intermediate" -}}
{{- include "clustermesh.fullname" . }}-intermediate
{{- end -}}

{{- define "clustermesh.certRenew.fullname" -}}{{ include "clustermesh.fullname" . }}-cert-renew{{- end -}}

{{- define "clustermesh.secret.ca" -}}
{{- .Values.certs.job.caSecret | default (printf "%s-ca" (include "clustermesh.fullname" .)) -}}
{{- end -}}

{{/* The in-cluster DNS names of the apiserver Service (SANs of the etcd and gRPC server certificates). */}}
{{- define "clustermesh.serverSans" -}}
{{- $svc := include "clustermesh.apiserver.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $sans := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- if eq .Values.etcd.mode "managed" -}}
{{- /* the address the apiserver dials its own managed etcd on (it listens on all of the pod's addresses) */ -}}
{{- $sans = append $sans "0.0.0.0" -}}
{{- end -}}
{{- concat $sans .Values.certs.extraSans | uniq | join "," -}}
{{- end -}}

{{/* The local etcd endpoints (comma separated) the apiserver (external mode) and node-sync use. */}}
{{- define "clustermesh.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "external" -}}
{{- required "etcd.external.endpoints is required with etcd.mode=external" (.Values.etcd.external.endpoints | join ",") -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%d" (include "clustermesh.apiserver.fullname" .) .Release.Namespace (int .Values.etcd.port) -}}
{{- end -}}
{{- end -}}

{{/* Rules and ranges the schema cannot say alone, checked when rendering. */}}
{{- define "clustermesh.validate" -}}
{{- if and (eq .Values.etcd.mode "managed") (gt (int .Values.apiserver.replicas) 1) -}}
{{- fail "apiserver.replicas > 1 needs etcd.mode=external: replicas elect a leader through a shared etcd, and the managed etcd lives inside one apiserver pod" -}}
{{- end -}}
{{- if and (eq .Values.etcd.clientTrust "cluster") (eq .Values.certs.mode "certManager") -}}
{{- fail "etcd.clientTrust=cluster needs the cluster's client-ca.pem (its own intermediate), which certs.mode=certManager does not produce: use certs.mode=job or existing" -}}
{{- end -}}
{{- if and (eq .Values.etcd.clientTrust "cluster") (ne .Values.etcd.mode "managed") -}}
{{- fail "etcd.clientTrust applies to the managed etcd; an external etcd's --trusted-ca-file is yours to set (the cluster's client-ca.pem for the same effect)" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.clustermesh.config.clusters -}}
{{- if eq .name $.Values.cluster.name -}}
{{- fail (printf "clustermesh.config.clusters: %q is this cluster's own name (cluster.name)" .name) -}}
{{- end -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "clustermesh.config.clusters: %q is listed twice" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- if and (eq .Values.certs.mode "job") (gt (int .Values.cluster.id) 255) -}}
{{- fail (printf "certs.mode=job: `clustermesh ca issue-cluster` issues cluster ids 1..255 only, and cluster.id is %d; use certs.mode=existing or certManager" (int .Values.cluster.id)) -}}
{{- end -}}
{{- if and (eq .Values.certs.mode "certManager") (not .Values.certs.certManager.issuerRef.name) (not .Values.certs.certManager.caSecret) -}}
{{- fail "certs.mode=certManager needs certs.certManager.issuerRef.name or certs.certManager.caSecret" -}}
{{- end -}}
{{- end -}}
