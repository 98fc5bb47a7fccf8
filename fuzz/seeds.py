#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) and is kept next to them: small, meaningful
inputs per target (valid frames, edge cases). Run from fuzz/: python3 seeds.py"""
import json, os, struct

SPLIT = b"\xff\x00"  # the targets cut one input into messages (reads, datagrams) here


def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def crc16(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# The poll of fuzz/src/lib.rs's Modbus points, in plan order: (function, address, count).
REQUESTS = [(1, 0, 1), (1, 9, 1), (2, 3, 1), (2, 15, 1), (4, 0, 3), (3, 0, 29), (3, 39, 1)]


def pdu(fn, count, fill):
    if fn in (1, 2):
        return bytes([fn, 1, fill & 1])
    regs = b"".join(struct.pack(">H", (fill * 257 + i) & 0xFFFF) for i in range(count))
    return bytes([fn, len(regs)]) + regs


def mbap(tid, unit, body):
    return struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body


def rtu(unit, body):
    frame = bytes([unit]) + body
    return frame + struct.pack("<H", crc16(frame))


# Modbus TCP
answers = [mbap(t, 1, pdu(fn, n, 0x41)) for t, (fn, _, n) in enumerate(REQUESTS)]
write("modbus_tcp", "full_poll", b"".join(answers))
write("modbus_tcp", "first_answer_only", answers[0])
write("modbus_tcp", "exception", mbap(0, 1, bytes([0x81, 0x02])) + b"".join(answers[1:]))
write("modbus_tcp", "wrong_transaction", mbap(7, 1, pdu(1, 1, 1)))
write("modbus_tcp", "short_register_answer", b"".join(answers[:5]) + mbap(5, 1, bytes([3, 4, 0, 1, 0, 2])))
write("modbus_tcp", "length_lies", struct.pack(">HHHB", 0, 0, 0xFFFF, 1) + bytes([3, 0xFE]))
write("modbus_tcp", "empty", b"")

# Modbus RTU
frames = [rtu(1, pdu(fn, n, 0x20)) for fn, _, n in REQUESTS]
write("modbus_rtu", "full_poll", b"".join(frames))
write("modbus_rtu", "exception", rtu(1, bytes([0x83, 0x02])))
bad = bytearray(frames[0]); bad[-1] ^= 0xFF
write("modbus_rtu", "bad_crc", bytes(bad))
write("modbus_rtu", "truncated", frames[5][:10])
write("modbus_rtu", "other_unit", rtu(2, pdu(1, 1, 1)) + frames[0])
write("modbus_rtu", "noise", b"\x00\x13\x37\xde\xad\xbe\xef")

# CoAP (RFC 7252): ver 1, type, token length, code, message id, options, 0xff payload
def opt(delta, value):
    def ext(n):
        if n < 13: return n, b""
        if n < 269: return 13, bytes([n - 13])
        return 14, struct.pack(">H", n - 269)
    d, de = ext(delta); l, le = ext(len(value))
    return bytes([(d << 4) | l]) + de + le + value


def coap(typ, code, mid, options, payload=b"", token=b"\x01\x02"):
    head = bytes([0x40 | (typ << 4) | len(token), code]) + struct.pack(">H", mid) + token
    body, last = b"", 0
    for number, value in sorted(options, key=lambda o: o[0]):
        body += opt(number - last, value); last = number
    return head + body + ((b"\xff" + payload) if payload else b"")

URI_PATH, CONTENT, URI_QUERY, BLOCK1, SIZE1 = 11, 12, 15, 27, 60
path = [(URI_PATH, b"dev"), (URI_QUERY, b"token=s3cret-token")]
write("coap_listener", "post_json", coap(0, 0x02, 1, path + [(CONTENT, b"\x32")], b'{"temperature": 215, "on": true}'))
write("coap_listener", "put_non_open", coap(1, 0x03, 2, [(URI_PATH, b"open")], b'{"count": 5}'))
write("coap_listener", "plain_ambiguous", coap(0, 0x03, 14, [(URI_PATH, b"open")], b"21.5"))
write("coap_listener", "ping", coap(0, 0x00, 3, [], token=b""))
write("coap_listener", "get_refused", coap(0, 0x01, 4, [(URI_PATH, b"open")]))
write("coap_listener", "wrong_token", coap(0, 0x02, 5, [(URI_PATH, b"dev"), (URI_QUERY, b"token=nope")], b"1"))
write("coap_listener", "unknown_device", coap(0, 0x02, 6, [(URI_PATH, b"ghost")], b"1"))
write("coap_listener", "size1_too_large", coap(0, 0x02, 7, path + [(SIZE1, struct.pack(">I", 1 << 20))], b"1"))
blk = lambda num, more, szx: bytes([(num << 4) | (more << 3) | szx]) if num < 16 else struct.pack(">H", (num << 4) | (more << 3) | szx)
body = b'{"label": "' + b"x" * 20 + b'", "count": 7}'
write("coap_listener", "block1_transfer",
      coap(0, 0x02, 8, path + [(BLOCK1, blk(0, 1, 0))], body[:16]) + SPLIT +
      coap(0, 0x02, 9, path + [(BLOCK1, blk(1, 1, 0))], body[16:32]) + SPLIT +
      coap(0, 0x02, 10, path + [(BLOCK1, blk(2, 0, 0))], body[32:]))
write("coap_listener", "block1_out_of_order", coap(0, 0x02, 11, path + [(BLOCK1, blk(3, 1, 0))], b"x" * 16))
write("coap_listener", "retransmission", coap(0, 0x03, 12, [(URI_PATH, b"open")], b"1") + SPLIT + coap(0, 0x03, 12, [(URI_PATH, b"open")], b"1"))
write("coap_listener", "response_not_request", coap(2, 0x45, 13, []))
write("coap_listener", "truncated", b"\x42\x02\x00")

# MQTT ingest payloads: body, then a newline and the topic
write("mqtt_payload", "object", '{"temperature": 215, "count": 3, "on": false, "label": "ok"}\nplant/dev1/state')
write("mqtt_payload", "paths", '{"a": {"b": [{"c": 1.5}]}, "values": [1, 2, -3], "regs": {"u16": 65535}}')
write("mqtt_payload", "plain_for_topic", "21.5\nplant/dev1/temperature")
write("mqtt_payload", "plain_text", "hello world\nplant/dev1/label")
write("mqtt_payload", "plain_single_point", "true")
write("mqtt_payload", "type_mismatch", '{"count": -1, "delta": 70000, "big": 1e300}')
write("mqtt_payload", "huge_numbers", '{"huge": 18446744073709551615, "big": -9223372036854775808, "f": 3.5e38}')
write("mqtt_payload", "not_utf8", b"\xff\xfe{}")

# TCP connection bytes (reads cut at ff 00)
write("tcp_frames", "identify_then_values", "id=dev token=s3cret-token temperature=21.5 count=3\n" + '{"on": true}\r\n')
write("tcp_frames", "identify_only_json", '{"id": "dev", "token": "s3cret-token"}\nlabel="a b \\" c" delta=-5\n')
write("tcp_frames", "split_reads", b"id=dev tok" + SPLIT + b"en=s3cret-token\n\n  \ncount=1" + SPLIT + b"2\n")
write("tcp_frames", "no_id", "temperature=1\n")
write("tcp_frames", "too_large", "x" * 100 + "\n")
write("tcp_frames", "bad_line", "id=dev token=s3cret-token\ntemp 21\n{\"temperature\":\n")
write("tcp_frames", "numeric_id", '{"id": 12, "token": 34}\n')

# UDP datagrams (cut at ff 00)
write("udp_datagram", "line", "id=dev token=s3cret-token temperature=7.5")
write("udp_datagram", "json", '{"id":"open","on":true,"label":"x"}')
write("udp_datagram", "keepalive", "id=dev token=s3cret-token")
write("udp_datagram", "unauthorized", "id=dev token=bad temperature=1")
write("udp_datagram", "several", b"id=open count=1" + SPLIT + b"\xff\xfe" + SPLIT + b'{"id":"ghost"}')

# Command messages
write("command", "number_ttl", '{"id": "c1", "point": "setpoint", "value": 1234, "ttl": "5m"}')
write("command", "bool_expires_ms", '{"id": "c-2", "point": "on", "value": true, "expiresAt": 1700000000000}')
write("command", "text_expires_time", '{"id": "c_3", "point": "label", "value": "hello", "expiresAt": "2030-01-01T00:00:00Z", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}')
write("command", "unknown_field", '{"id": "c4", "point": "p", "value": 1, "extra": 1}')
write("command", "bad_id", '{"id": "../x", "point": "p", "value": 1}')
write("command", "huge_ttl", '{"id": "c5", "point": "p", "value": 1e308, "ttl": "99999999999999h"}')

# traceparent
write("traceparent", "sampled", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
write("traceparent", "future_version", "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra")
write("traceparent", "zero_ids", "00-00000000000000000000000000000000-0000000000000000-01")
write("traceparent", "uppercase", " 00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01 ")
write("traceparent", "version_ff", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")

# GatewayConfig documents
config = """apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- name: meter-1
  connection:
    modbusTcp: {host: 10.0.0.7, port: 502, unitId: 1, timeout: 500ms}
  pollInterval: 1s
  points:
  - {name: energy, type: float64, unit: kW.h, modbus: {table: holding, address: 0}}
  - {name: temperature, type: int16, unit: Cel, scale: 0.1, modbus: {table: input, address: 4}}
  - {name: running, type: bool, access: readWrite, modbus: {table: coil, address: 0}}
  - {name: label, type: string, modbus: {table: holding, address: 10, length: 4}}
- name: push-1
  connection: {coap: {}}
  points:
  - {name: t, type: float64, path: a.b, report: {onChange: true, deadband: 0.2, maxInterval: 60s}}
- name: tcp-1
  connection: {tcp: {id: sensor-1, tokenSecretRef: {name: tcp-1}}}
  points: [{name: temp, type: float64}]
- name: rtu-1
  connection: {modbusRtu: {port: /dev/ttyUSB0, baudRate: 9600, parity: none, unitId: 3}}
  points: [{name: v, type: uint32, modbus: {table: holding, address: 2, wordOrder: littleEndian}}]
- name: field-1
  connection: {mqtt: {url: "mqtt://10.0.0.9:1883", topics: ["plant/+/state"]}}
  points: [{name: level, type: float64}]
uplinks:
- name: cloud
  devices: [meter-1]
  encoding: json
  mqtt:
    url: mqtt://broker.example.com:1883
    protocolVersion: 5
    topic: "fieldgate/{namespace}/{device}/telemetry"
    commandTopic: "fieldgate/{namespace}/{device}/commands"
  buffer: {maxBytes: 1Gi, maxAge: 72h, onFull: dropOldest, redeliverAfter: 30s}
"""
write("config", "full", config)
write("config", "minimal", "apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\ndevices: []\nuplinks: []\n")
write("config", "misspelt_and_out_of_range", config.replace("scale: 0.1", "scael: 0.1").replace("port: 502", "port: 70000").replace("pollInterval: 1s", "pollInterval: fast"))
write("config", "secrets_missing", config.replace("    commandTopic", "    auth: {secretRef: {name: cloud-creds}}\n    tls: {caSecretRef: {name: ca, key: ../x}}\n    commandTopic"))
write("config", "json", json.dumps({"apiVersion": "fieldgate.io/v1alpha1", "kind": "GatewayConfig", "devices": [], "uplinks": [{"name": "u", "mqtt": {"url": "mqtts://h:8883", "topic": "t/{device}"}}]}))
write("config", "yaml_anchors", "a: &a [*a]\n")

# Management API bodies: first byte 0 = log level JSON, 1 = log level text, 2 = config
write("management", "level_json", b"\x00" + b'{"level": "info,fieldgate_gateway::uplinks=debug"}')
write("management", "level_text", b"\x01" + b"warn,hyper=off,[span{field=1}]=trace")
write("management", "level_bad", b"\x01" + b"=[[")
write("management", "config", b"\x02" + config.encode())

# Buffer entries: field 1 (length-delimited) per stored Reading
def varint(n):
    out = b""
    while True:
        b = n & 0x7F; n >>= 7
        if n: out += bytes([b | 0x80])
        else: return out + bytes([b])

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)

def reading(id_, points):
    r = field(1, 2, id_.encode()) + field(2, 2, b"default") + field(3, 2, b"meter-1") + field(4, 2, b"node-1")
    r += field(5, 1, struct.pack("<Q", 1_700_000_000_000_000_000))
    for p in points:
        r += field(7, 2, p)
    return r

pts = [
    field(1, 2, b"t") + field(5, 1, struct.pack("<d", 21.5)) + field(7, 2, b"Cel"),
    field(1, 2, b"i") + field(3, 0, varint(2**64 - 1)),
    field(1, 2, b"n") + field(4, 0, varint(2**63)),
    field(1, 2, b"s") + field(6, 2, b"text"),
    field(1, 2, b"b") + field(2, 0, varint(1)),
]
entry = b"".join(field(1, 2, reading(f"default/meter-1/{i}", pts)) for i in range(3))
write("envelope", "three_readings", entry)
write("envelope", "empty_reading", field(1, 2, b""))
write("envelope", "truncated", entry[:-5])
write("envelope", "other_field", field(2, 0, varint(1)))
