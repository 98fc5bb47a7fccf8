"""Reads `mosquitto_sub -v` lines from stdin and prints, once a second, how many readings the
cloud received and a sample reading. Used by scripts/demo.sh."""

import json
import sys
import time


def describe(topic: str, payload: str) -> tuple[str | None, str]:
    try:
        reading = json.loads(payload)
    except ValueError:
        return None, f"{topic}: {len(payload)} bytes (protobuf)"
    points = {p["name"]: p.get("value") for p in reading.get("points", [])}
    shown = ", ".join(f"{k}={points[k]!r}" for k in ("u16", "f32", "i64", "coil0", "label") if k in points)
    return reading.get("id"), f"{reading.get('device')} seq {reading.get('bufferSeq')}: {shown}"


def main() -> None:
    count, ids, sample = 0, set(), ""
    start = last = time.time()
    for line in sys.stdin:
        topic, _, payload = line.rstrip("\n").partition(" ")
        count += 1
        msg_id, sample = describe(topic, payload)
        if msg_id:
            ids.add(msg_id)
        now = time.time()
        if now - last >= 1:
            last = now
            unique = len(ids) if ids else count
            print(f"[{now - start:5.0f}s] cloud received {count} readings ({unique} unique) | {sample}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
