{{/*
The TLS volume of a component: the files of a `clustermesh ca issue-cluster` directory that the
component needs, mounted at clustermesh.tlsDir and passed as --tls-dir.
Call with (dict "root" . "component" "apiserver"|"nodeSync").
*/}}
{{- define "clustermesh.tlsRoles" -}}
{{- if eq .component "apiserver" -}}etcd-server apiserver root admin{{- else -}}node remote{{- end -}}
{{- end -}}

{{- define "clustermesh.tlsVolume" -}}
{{- $root := .root -}}
- name: tls
{{- if eq $root.Values.certs.mode "certManager" }}
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ include "clustermesh.fullname" $root }}-cluster-info
          items:
            - key: cluster.json
              path: cluster.json
      {{- range $i, $role := splitList " " (include "clustermesh.tlsRoles" .) }}
      - secret:
          name: {{ include "clustermesh.fullname" $root }}-{{ $role }}-tls
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
  secret:
    secretName: {{ if eq .component "apiserver" }}{{ include "clustermesh.secret.apiserver" $root }}{{ else }}{{ include "clustermesh.secret.nodeSync" $root }}{{ end }}
    defaultMode: 0440
{{- end }}
{{- end -}}
