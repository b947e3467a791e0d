#!/usr/bin/env bash
# A Confluent-compatible Schema Registry on 127.0.0.1 for tests: Apicurio Registry 3.x, in-memory
# storage, its Confluent API under /apis/ccompat/v7.
#
#   scripts/registry.sh start    fetch the bundle with Maven (once), unpack it, start, wait
#   scripts/registry.sh status   print the URL; exit 1 when not running
#   scripts/registry.sh stop     stop it and remove its state
#
# State lives in $SEGLOOP_REGISTRY_DIR (default: /tmp/segloop-registry): `url` holds the base URL
# the tests read (http://127.0.0.1:PORT/apis/ccompat/v7), `registry.log` its log, `registry.pid`
# its pid. Apicurio 3 needs Java 21+: $SEGLOOP_REGISTRY_JAVA, else the first JDK 21+ found.
# Both its ports (HTTP and management) are free ports on loopback.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SEGLOOP_REGISTRY_DIR:-/tmp/segloop-registry}
version=3.3.3
dist="$here/registry/target/apicurio-registry-$version"
log="$dir/registry.log"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

running() {
  [ -f "$dir/registry.pid" ] && kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null
}

fail() {
  echo "registry.sh: $*" >&2
  if [ -f "$log" ]; then
    echo "---- last 60 lines of $log ----" >&2
    tail -n 60 "$log" >&2
  fi
  exit 1
}

# The major version of a java binary, or 0.
java_major() {
  "$1" -XshowSettings:properties -version 2>&1 | awk -F' = ' '/java.specification.version/ { print $2 }' | cut -d. -f1 || echo 0
}

find_java() {
  local candidates=()
  [ -n "${SEGLOOP_REGISTRY_JAVA:-}" ] && candidates+=("$SEGLOOP_REGISTRY_JAVA")
  command -v java >/dev/null && candidates+=("$(command -v java)")
  for j in /usr/lib/jvm/*/bin/java; do candidates+=("$j"); done
  for j in "${candidates[@]}"; do
    if [ -x "$j" ] && [ "$(java_major "$j")" -ge 21 ] 2>/dev/null; then
      echo "$j"
      return 0
    fi
  done
  return 1
}

fetch() {
  [ -f "$dist/quarkus-run.jar" ] && return 0
  local tgz="$HOME/.m2/repository/io/apicurio/apicurio-registry-app/$version/apicurio-registry-app-$version-all.tar.gz"
  if [ ! -f "$tgz" ]; then
    echo "fetching Apicurio Registry $version with Maven..."
    # The bundle's own dependencies are not resolvable here (and not needed): no transitive.
    mvn -q -B dependency:get -Dtransitive=false \
      -Dartifact="io.apicurio:apicurio-registry-app:$version:tar.gz:all" >"$dir.mvn.log" 2>&1 \
      || { cat "$dir.mvn.log" >&2; fail "maven could not fetch io.apicurio:apicurio-registry-app:$version:tar.gz:all"; }
  fi
  mkdir -p "$dist.tmp"
  tar xzf "$tgz" -C "$dist.tmp" || fail "cannot unpack $tgz"
  local jar
  jar=$(find "$dist.tmp" -name quarkus-run.jar | head -n 1)
  [ -n "$jar" ] || fail "no quarkus-run.jar in $tgz"
  rm -rf "$dist"
  mv "$(dirname "$jar")" "$dist"
  rm -rf "$dist.tmp"
}

start() {
  if running; then
    echo "registry already running at $(cat "$dir/url")"
    return 0
  fi
  local java
  java=$(find_java) || fail "Apicurio Registry $version needs Java 21+; none found (set SEGLOOP_REGISTRY_JAVA)"
  rm -rf "$dir"
  mkdir -p "$dir"
  fetch
  local port mport
  port=$(free_port)
  mport=$(free_port)
  (cd "$dir" && exec setsid "$java" -Xmx512m \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$mport" \
    -jar "$dist/quarkus-run.jar" >"$log" 2>&1 </dev/null) &
  echo $! >"$dir/registry.pid"
  local url="http://127.0.0.1:$port/apis/ccompat/v7"
  for _ in $(seq 1 240); do
    if ! running; then
      fail "the registry exited during startup"
    fi
    if curl -sf "$url/subjects" >/dev/null 2>&1; then
      echo "$url" >"$dir/url"
      echo "registry running at $url (pid $(cat "$dir/registry.pid"))"
      return 0
    fi
    sleep 0.5
  done
  fail "the registry did not answer on $url within 120 s"
}

status() {
  if running && [ -f "$dir/url" ]; then
    echo "registry running at $(cat "$dir/url") (pid $(cat "$dir/registry.pid"))"
  else
    echo "registry not running"
    return 1
  fi
}

stop() {
  if running; then
    local pid
    pid=$(cat "$dir/registry.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "registry stopped"
  else
    echo "registry was not running"
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
