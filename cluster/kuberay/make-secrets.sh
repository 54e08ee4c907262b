#!/usr/bin/env bash
# Create the four Secrets that cluster/kuberay/raycluster.yaml reads, with fresh values,
# and keep private copies for the operator and the gRPC clients:
#
#   cluster/kuberay/make-secrets.sh [OUT_DIR]     # default ./memstore-secrets
#
#   memstore-ray-token    key auth_token: Ray's token (RAY_AUTH_TOKEN of every pod; the
#                         dashboard and job API through `kubectl port-forward` need it)
#   memstore-grpc-tokens  key tokens: `memstore serve`'s token file, two lines
#                           <admin token> read,write,admin
#                           <reader token> read
#   memstore-checkpoint-secret  key secret: the operator's checkpoint secret
#                         (MEMSTORE_CHECKPOINT_SECRET of every pod that makes, restores
#                         or loads tables: checkpoints are signed and verified with it)
#   memstore-grpc-tls     type kubernetes.io/tls: the server's certificate and key. Given
#                         as TLS_CERT and TLS_KEY (PEM files, e.g. from your CA or
#                         cert-manager), else a self-signed certificate for
#                         memstore-grpc.$NAMESPACE.svc made here (valid 365 days).
#
# OUT_DIR (mode 0700, files 0600) holds: ray-token; checkpoint-secret; grpc-tokens (the server's file);
# grpc-admin.token and grpc-read.token (a client's --token-file, one token each); and
# grpc-ca.crt (the certificate clients trust: --tls-ca). The script refuses an OUT_DIR
# that exists, so no value is ever reused or overwritten.
#
# Environment: NAMESPACE (default: kubectl's current one, else default), KUBECTL (default
# kubectl), TLS_CERT/TLS_KEY (both or neither), OPENSSL (default openssl).
set -Eeuo pipefail

OUT="${1:-./memstore-secrets}"
KUBECTL="${KUBECTL:-kubectl}"
OPENSSL="${OPENSSL:-openssl}"
NAMESPACE="${NAMESPACE:-$("$KUBECTL" config view --minify -o 'jsonpath={..namespace}' 2>/dev/null || true)}"
NAMESPACE="${NAMESPACE:-default}"

if [[ -e "$OUT" || -L "$OUT" ]]; then
  echo "make-secrets.sh: $OUT exists; refusing to reuse or overwrite secrets" >&2; exit 2
fi
if [[ -n "${TLS_CERT:-}" && -z "${TLS_KEY:-}" || -z "${TLS_CERT:-}" && -n "${TLS_KEY:-}" ]]; then
  echo "make-secrets.sh: give both TLS_CERT and TLS_KEY, or neither" >&2; exit 2
fi

umask 077
mkdir -m 700 -- "$OUT"
token() { "$OPENSSL" rand -hex 32; }

token | tr -d '\n' > "$OUT/ray-token"
token | tr -d '\n' > "$OUT/checkpoint-secret"
admin="$(token)" reader="$(token)"
printf '%s read,write,admin\n%s read\n' "$admin" "$reader" > "$OUT/grpc-tokens"
printf '%s read,write,admin\n' "$admin" > "$OUT/grpc-admin.token"
printf '%s read\n' "$reader" > "$OUT/grpc-read.token"

if [[ -n "${TLS_CERT:-}" ]]; then
  cp -- "$TLS_CERT" "$OUT/tls.crt"
  cp -- "$TLS_KEY" "$OUT/tls.key"
else
  host="memstore-grpc.$NAMESPACE.svc"
  "$OPENSSL" req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=$host" \
    -addext "subjectAltName=DNS:$host,DNS:$host.cluster.local,DNS:memstore-grpc" \
    -keyout "$OUT/tls.key" -out "$OUT/tls.crt" 2>/dev/null
fi
cp -- "$OUT/tls.crt" "$OUT/grpc-ca.crt"

"$KUBECTL" -n "$NAMESPACE" create secret generic memstore-ray-token \
  --from-file=auth_token="$OUT/ray-token"
"$KUBECTL" -n "$NAMESPACE" create secret generic memstore-checkpoint-secret \
  --from-file=secret="$OUT/checkpoint-secret"
"$KUBECTL" -n "$NAMESPACE" create secret generic memstore-grpc-tokens \
  --from-file=tokens="$OUT/grpc-tokens"
"$KUBECTL" -n "$NAMESPACE" create secret tls memstore-grpc-tls \
  --cert="$OUT/tls.crt" --key="$OUT/tls.key"
echo "make-secrets.sh: secrets created in namespace $NAMESPACE; copies in $OUT" >&2
