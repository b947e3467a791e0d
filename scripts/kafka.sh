#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, combined broker + controller) on 127.0.0.1 for tests.
#
#   scripts/kafka.sh start    fetch the jars with Maven (once), format storage, start, wait
#   scripts/kafka.sh status   print the bootstrap address; exit 1 when not running
#   scripts/kafka.sh restart  stop the broker and start it again on the same port and storage
#   scripts/kafka.sh stop     stop it and remove its storage
#
# State lives in $SEGLOOP_KAFKA_DIR (default: /tmp/segloop-kafka): `bootstrap` holds the
# address the tests read, `broker.log` the broker's log, `broker.pid` its pid.
#
# One broker, several listeners (one broker keeps CI time down):
#   PLAINTEXT  `bootstrap`       no auth; principal ANONYMOUS is a super user (the other suites)
#   SASL_SSL   `sasl_bootstrap`  SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN; users admin (super
#                                user), alice and bob (no ACLs until a test grants them)
#   SSL        `ssl_bootstrap`   mutual TLS: a client certificate is required; CN=segloop-mtls
#                                maps to the super user segloop-mtls
# with the StandardAuthorizer on, a private CA and certificates in `tls/` (ca.pem, client.pem,
# client.key, and other-ca.pem, a CA that signed nothing here). The broker certificate names
# IP 127.0.0.1 only, so `localhost` is a hostname mismatch. Passwords: `<user>-secret`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SEGLOOP_KAFKA_DIR:-/tmp/segloop-kafka}
libs="$here/kafka/target/kafka-libs"
log="$dir/broker.log"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

running() {
  [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null
}

fail() {
  echo "kafka.sh: $*" >&2
  if [ -f "$log" ]; then
    echo "---- last 80 lines of $log ----" >&2
    tail -n 80 "$log" >&2
  fi
  exit 1
}

start() {
  if running; then
    echo "kafka already running at $(cat "$dir/bootstrap")"
    return 0
  fi
  command -v java >/dev/null || fail "java is not installed (Java 17+ is needed)"
  if [ ! -f "$libs/kafka_2.13-4.1.0.jar" ]; then
    echo "fetching Apache Kafka jars with Maven..."
    mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$libs" >"$dir.mvn.log" 2>&1 || { cat "$dir.mvn.log" >&2; fail "maven could not fetch the Kafka jars"; }
  fi
  rm -rf "$dir"
  mkdir -p "$dir/data"
  local port cport sport tport
  port=$(free_port)
  cport=$(free_port)
  sport=$(free_port)
  tport=$(free_port)
  command -v openssl >/dev/null || fail "openssl is not installed (the TLS listeners need certificates)"
  certificates "$dir/tls" >"$dir/tls.log" 2>&1 || { cat "$dir/tls.log" >&2; fail "cannot make the test certificates"; }
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport,SASL_SSL://127.0.0.1:$sport,SSL://127.0.0.1:$tport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$sport,SSL://127.0.0.1:$tport
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_admin="admin-secret" user_alice="alice-secret" user_bob="bob-secret";
ssl.keystore.type=PEM
ssl.keystore.location=$dir/tls/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/tls/ca.pem
listener.name.ssl.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+).*\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS;User:admin;User:segloop-mtls
log.dirs=$dir/data
num.partitions=2
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
PROPS
  local cp="$libs/*"
  local t0=$SECONDS
  local scram=()
  for user in admin alice bob; do
    scram+=(--add-scram "SCRAM-SHA-256=[name=$user,password=$user-secret]")
    scram+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$user-secret]")
  done
  java -cp "$cp" kafka.tools.StorageTool format -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid)" \
    -c "$dir/server.properties" "${scram[@]}" >"$log" 2>&1 || fail "formatting KRaft storage failed"
  launch "$port"
  echo "127.0.0.1:$port" >"$dir/bootstrap"
  echo "127.0.0.1:$sport" >"$dir/sasl_bootstrap"
  echo "127.0.0.1:$tport" >"$dir/ssl_bootstrap"
  echo "kafka 4.1.0 started at 127.0.0.1:$port in $((SECONDS - t0)) s (log: $log)"
}

# A private CA, the broker's certificate (IP 127.0.0.1 only), a client certificate for mutual
# TLS (CN=segloop-mtls) and an unrelated CA, in directory $1.
certificates() {
  local d=$1
  mkdir -p "$d"
  cd "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=segloop-test-ca" \
    -keyout ca.key -out ca.pem
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=some-other-ca" \
    -keyout other-ca.key -out other-ca.pem
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout broker.key -out broker.csr
  printf 'subjectAltName=IP:127.0.0.1\n' >broker.ext
  openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 \
    -extfile broker.ext -out broker.pem
  openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.pk8
  cat broker.pk8 broker.pem >broker-keystore.pem
  openssl req -newkey rsa:2048 -nodes -subj "/CN=segloop-mtls" -keyout client.key -out client.csr
  openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 -out client.pem
  cd - >/dev/null
}

# Starts the broker of $dir/server.properties and waits until it serves on port $1.
launch() {
  local port=$1 started
  started=$(grep -c "Kafka Server started" "$log" 2>/dev/null || true)
  nohup java -Xms256m -Xmx768m -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$dir/server.properties" >>"$log" 2>&1 &
  echo $! >"$dir/broker.pid"
  # Ready = the broker logged a (new) start and the port accepts connections.
  for _ in $(seq 1 240); do
    running || fail "the broker exited during startup"
    if [ "$(grep -c "Kafka Server started" "$log" 2>/dev/null || true)" -gt "${started:-0}" ] \
      && python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', $port))" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  fail "the broker did not become ready within 120 s"
}

halt() {
  local pid
  pid=$(cat "$dir/broker.pid")
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
}

restart() {
  running || fail "kafka is not running"
  local port t0=$SECONDS
  port=$(cut -d: -f2 <"$dir/bootstrap")
  halt
  launch "$port"
  echo "kafka restarted at 127.0.0.1:$port in $((SECONDS - t0)) s"
}

status() {
  if running && [ -f "$dir/bootstrap" ]; then
    echo "kafka running at $(cat "$dir/bootstrap") (pid $(cat "$dir/broker.pid"))"
  else
    echo "kafka not running"
    return 1
  fi
}

stop() {
  if running; then
    halt
    echo "kafka stopped"
  else
    echo "kafka was not running"
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  restart) restart ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start|restart|status|stop" >&2; exit 2 ;;
esac
