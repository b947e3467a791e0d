"""Produces telemetry with the Python Confluent client's AvroSerializer: an implementation of
the Confluent framing and the Schema Registry protocol independent of segloop's.

    avro_producer.py BOOTSTRAP REGISTRY_URL TOPIC SCHEMA_FILE COUNT SEGMENTS START_TS

Registers SCHEMA_FILE under TOPIC-value (TopicNameStrategy), prints `id N` (the id the
registry gave), then produces COUNT records over SEGMENTS segments (`py/s<i>`, key = segment,
murmur2 partitioning like Java producers), event times from START_TS 10 ms apart: milliseconds
since the epoch, or `now+N` / `now-N`, N ms from when producing starts (after the start-up
and the registration, which took over 10 s on a loaded machine). Fields of the
schema beyond the current ones get values. The `error` measurement is $AVRO_PRODUCER_ERROR
(default 0).
"""
import json
import os
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main():
    bootstrap, registry, topic, schema_file, count, segments, start = sys.argv[1:8]
    count, segments = int(count), int(segments)
    schema = open(schema_file).read()
    fields = {f["name"] for f in json.loads(schema)["fields"]}
    # A request the registry never answers fails after 10 s and is retried (the client's
    # default is no timeout: one stuck request hung the suite).
    client = SchemaRegistryClient({"url": registry, "timeout": 10, "max.retries": 5})
    serializer = AvroSerializer(client, schema, conf={"auto.register.schemas": True})
    ctx = SerializationContext(topic, MessageField.VALUE)
    error = float(os.environ.get("AVRO_PRODUCER_ERROR", "0"))

    def start_ms():
        if start.startswith("now"):
            return int(time.time() * 1000) + int(start[3:])
        return int(start)

    base = start_ms()  # for the record that registers the schema; again once producing

    def record(i):
        r = {
            "segment": f"py/s{i % segments}",
            "ts_ms": base + i * 10,
            "measurements": {"error": error, "latency_ms": 20.0 + i % 7},
            "labels": {"producer": "python"},
            "event_id": f"py-{i}",
        }
        if "host" in fields:
            r["host"] = "py-host"
        if "sample_rate" in fields:
            r["sample_rate"] = 0.5
        return r

    first = serializer(record(0), ctx)
    schema_id = int.from_bytes(first[1:5], "big")
    base = start_ms()
    print(f"id {schema_id}", flush=True)
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "linger.ms": 5})
    for i in range(count):
        r = record(i)
        producer.produce(topic, key=r["segment"].encode(), value=serializer(r, ctx))
        producer.poll(0)
    left = producer.flush(30)
    if left:
        sys.exit(f"{left} records not delivered")
    print("done", flush=True)


if __name__ == "__main__":
    main()
