#!/usr/bin/env python3
"""Avro interop evidence for segloop, written with an independent implementation (fastavro).

  interop.py generate DIR     write golden records (3 framings x 3 telemetry schema versions,
                              plus command and outcome) as hex lines, and the JSON the current
                              reader must decode them to
  interop.py check            regenerate into a temp dir and compare with tests/golden byte for byte
  interop.py decode-ours DIR  decode records that segloop encoded (DIR/<schema>.<codec>.hex next to
                              DIR/<schema>.jsonl) with fastavro and compare with the source JSON

Confluent ids used by the goldens: 1 = current telemetry (and current command/outcome),
2 = telemetry v1 (older), 3 = telemetry v3 (newer).
"""
import filecmp
import io
import json
import os
import struct
import sys
import tempfile

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")

SCHEMA_FILES = {
    "telemetry.v1": os.path.join(ROOT, "schemas", "history", "telemetry.v1.avsc"),
    "telemetry.v2": os.path.join(ROOT, "schemas", "telemetry.avsc"),
    "telemetry.v3": os.path.join(GOLDEN, "schemas", "telemetry.v3.avsc"),
    "command": os.path.join(ROOT, "schemas", "command.avsc"),
    "outcome": os.path.join(ROOT, "schemas", "outcome.avsc"),
}
CONFLUENT_IDS = {"telemetry.v1": 2, "telemetry.v2": 1, "telemetry.v3": 3, "command": 1, "outcome": 1}


def load(name):
    with open(SCHEMA_FILES[name]) as f:
        return fastavro.parse_schema(json.load(f))


def crc64_fingerprint(schema):
    # fastavro returns the CRC-64-AVRO value as hex of its little-endian bytes
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def datum(schema, record):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def frame(framing, name, schema, record):
    body = datum(schema, record)
    if framing == "single-object":
        return b"\xc3\x01" + crc64_fingerprint(schema) + body
    if framing == "confluent":
        return b"\x00" + struct.pack(">I", CONFLUENT_IDS[name]) + body
    return body


def telemetry_records(version):
    base = [
        {"segment": "eu-1/checkout/payments", "ts_ms": 1764000000000,
         "measurements": {"latency_ms": 212.5, "error": 0.0}},
        {"segment": "us-2/search/query", "ts_ms": 1764000000123,
         "measurements": {"latency_ms": 1e-3, "error": 1.0, "cpu": 0.875}},
        {"segment": "ap-3/äpp/ünïcode", "ts_ms": 0, "measurements": {}},
    ]
    out, expected = [], []
    for i, r in enumerate(base):
        rec = dict(r)
        exp = dict(r, labels={}, event_id=None)
        if version >= 2 and i != 2:
            rec["labels"] = {"region": r["segment"].split("/")[0], "version": "v%d" % (40 + i)}
            rec["event_id"] = "evt-%d" % i if i == 0 else None
            exp["labels"], exp["event_id"] = rec["labels"], rec["event_id"]
        if version >= 3:
            rec["host"] = "host-%d" % i if i != 1 else None
            rec["sample_rate"] = 0.5
        out.append(rec)
        expected.append(exp)
    return out, expected


def command_records():
    r = {"command_id": "5b0f2a9e-0d8e-5c4e-9d1a-3f2b1c0e9a77", "segment": "eu-1/checkout/payments",
         "policy": "high-latency", "policy_version": 3, "action": "rollback",
         "params": {"to": "previous", "strategy": "canary"}, "attempt": 2,
         "issued_at_ms": 1764000010000, "ack_deadline_ms": 1764000040000,
         "reason": {"condition": "p99(latency_ms) > 250 and count() >= 20",
                    "metric": "p99(latency_ms)", "observed": 412.25, "threshold": 250.0,
                    "window_start_ms": 1764000000000, "window_end_ms": 1764000010000},
         "dry_run": False}
    return [r], [r]


def outcome_records():
    rs = [{"command_id": "5b0f2a9e-0d8e-5c4e-9d1a-3f2b1c0e9a77", "segment": "eu-1/checkout/payments",
           "status": s, "ts_ms": 1764000011000 + i, "actuator": "deployer-7",
           "message": None if s == "ACCEPTED" else "done: %s" % s.lower()}
          for i, s in enumerate(["ACCEPTED", "APPLIED", "FAILED", "REJECTED"])]
    return rs, rs


def cases():
    for v in (1, 2, 3):
        recs, exp = telemetry_records(v)
        yield "telemetry.v%d" % v, recs, exp
    recs, exp = command_records()
    yield "command", recs, exp
    recs, exp = outcome_records()
    yield "outcome", recs, exp


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name, recs, expected in cases():
        schema = load(name)
        for framing in ("single-object", "confluent", "raw"):
            with open(os.path.join(out_dir, "%s.%s.hex" % (name, framing)), "w") as f:
                for r in recs:
                    f.write(frame(framing, name, schema, r).hex() + "\n")
        with open(os.path.join(out_dir, "%s.expected.jsonl" % name), "w") as f:
            for e in expected:
                f.write(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n")


def check():
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        names = sorted(n for n in os.listdir(tmp))
        bad = [n for n in names if not os.path.exists(os.path.join(GOLDEN, n))
               or not filecmp.cmp(os.path.join(tmp, n), os.path.join(GOLDEN, n), shallow=False)]
        if bad:
            print("goldens differ from a fresh fastavro run: %s" % ", ".join(bad))
            return 1
        print("goldens: %d files match a fresh fastavro %s run" % (len(names), fastavro.__version__))
        return 0


def plain(v):
    """fastavro returns timestamp-millis as datetime (also inside nested records): back to ms."""
    if hasattr(v, "timestamp"):
        return int(round(v.timestamp() * 1000))
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def decode_ours(d):
    """Files written by `segloop encode`: <schema>.<codec>.hex lines from <schema>.jsonl."""
    checked = 0
    current = {"telemetry": "telemetry.v2", "command": "command", "outcome": "outcome"}
    for kind, name in current.items():
        src = os.path.join(d, "%s.jsonl" % kind)
        if not os.path.exists(src):
            continue
        with open(src) as f:
            want = [json.loads(l) for l in f if l.strip()]
        schema = load(name)
        fp = crc64_fingerprint(schema)
        for framing in ("avro-single-object", "avro-confluent", "avro-raw"):
            with open(os.path.join(d, "%s.%s.hex" % (kind, framing))) as f:
                lines = [bytes.fromhex(l.strip()) for l in f if l.strip()]
            assert len(lines) == len(want), (kind, framing, len(lines), len(want))
            for raw, w in zip(lines, want):
                if framing == "avro-single-object":
                    assert raw[:2] == b"\xc3\x01", raw[:2]
                    assert raw[2:10] == fp, "fingerprint %s != fastavro's %s" % (raw[2:10].hex(), fp.hex())
                    body = raw[10:]
                elif framing == "avro-confluent":
                    assert raw[0] == 0 and struct.unpack(">I", raw[1:5])[0] == 1
                    body = raw[5:]
                else:
                    body = raw
                buf = io.BytesIO(body)
                got = fastavro.schemaless_reader(buf, schema, schema)
                assert buf.read() == b"", "trailing bytes after datum"
                if kind == "telemetry":
                    w = dict({"labels": {}, "event_id": None}, **w)
                for k in w:
                    g = plain(got[k])
                    assert g == w[k], "%s %s field %s: fastavro read %r, expected %r" % (kind, framing, k, g, w[k])
                checked += 1
    if checked == 0:
        print("decode-ours: nothing to check in %s" % d)
        return 1
    print("decode-ours: fastavro decoded %d segloop-encoded records correctly" % checked)
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "generate" and len(sys.argv) == 3:
        generate(sys.argv[2])
    elif cmd == "check":
        sys.exit(check())
    elif cmd == "decode-ours" and len(sys.argv) == 3:
        sys.exit(decode_ours(sys.argv[2]))
    else:
        print(__doc__)
        sys.exit(2)
