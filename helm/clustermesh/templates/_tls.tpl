{{/*
The TLS volume of a component: the files of a `clustermesh ca issue-cluster` directory that the
component needs (ca-bundle.pem, cluster.json, <role>.crt, <role>.key), mounted at clustermesh.tlsDir
and passed as --tls-dir. With KVStoreMesh the apiserver also reads other clusters' etcds, as
remote-<cluster>, so it gets remote.{crt,key} too.
Call with (dict "root" . "component" "apiserver"|"nodeSync").
*/}}
{{- define "clustermesh.tlsRoles" -}}
{{- if eq .component "apiserver" -}}
etcd-server apiserver root admin{{ if .root.Values.clustermesh.kvstoremesh }} remote{{ end }}
{{- else -}}
node remote
{{- end -}}
{{- end -}}

{{- define "clustermesh.tlsVolume" -}}
{{- $root := .root -}}
{{- $fullname := include "clustermesh.fullname" $root -}}
- name: tls
  projected:
    defaultMode: 288 # 0440
    sources:
{{- if eq $root.Values.certs.mode "certManager" }}
      - configMap:
          name: {{ $fullname }}-cluster-info
          items:
            - key: cluster.json
              path: cluster.json
      {{- range $i, $role := splitList " " (include "clustermesh.tlsRoles" .) }}
      - secret:
          name: {{ $fullname }}-{{ $role }}-tls
          items:
            - key: tls.crt
              path: {{ $role }}.crt
            - key: tls.key
              path: {{ $role }}.key
            {{- if eq $i 0 }}
            - key: ca.crt
              path: ca-bundle.pem
            {{- end }}
      {{- end }}
{{- else }}
{{- $secret := ternary (include "clustermesh.secret.apiserver" $root) (include "clustermesh.secret.nodeSync" $root) (eq .component "apiserver") }}
      - secret:
          name: {{ $secret }}
          items:
            - key: ca-bundle.pem
              path: ca-bundle.pem
            - key: cluster.json
              path: cluster.json
            {{- if and (eq .component "apiserver") (eq (include "clustermesh.etcdClientTrust" $root) "cluster") }}
            # The managed etcd's client trust: the cluster's own intermediate only.
            - key: client-ca.pem
              path: client-ca.pem
            {{- end }}
            {{- range splitList " " (include "clustermesh.tlsRoles" .) }}
            - key: {{ . }}.crt
              path: {{ . }}.crt
            - key: {{ . }}.key
              path: {{ . }}.key
            {{- end }}
{{- if and (eq .component "apiserver") (eq (include "clustermesh.etcdClientTrust" $root) "cluster") }}
      # The cluster's intermediate, with which the apiserver signs the reader certificates other clusters
      # read this etcd with (gRPC connect, IssueRemoteReader). Under cluster trust it opens this cluster's
      # etcd only, which the apiserver already administers as root. Optional: without it the apiserver
      # runs and the gRPC connect to this cluster fails its preflight, saying so.
      - secret:
          name: {{ ternary (include "clustermesh.secret.intermediate" $root) $secret (eq $root.Values.certs.mode "job") }}
          optional: true
          items:
            - key: intermediate.crt
              path: intermediate.crt
            - key: intermediate.key
              path: intermediate.key
{{- end }}
{{- end }}
{{- end -}}
