'use strict';
// Decodes Sparkplug B payloads with Eclipse Tahu's sparkplug-payload (the reference JavaScript
// implementation), independently of the gateway's Rust code.
//
// Input: one JSON object a line, {"topic": "...", "payload": "<base64>"}.
// Output: one JSON object a line, {"topic": "...", "payload": <decoded>} or {"topic", "error"}.
// 64-bit integers (Long) are written as decimal strings, byte arrays as base64.
const readline = require('readline');
const sparkplug = require('sparkplug-payload').get('spBv1.0');

function isLong(v) {
  return v !== null && typeof v === 'object' && 'low' in v && 'high' in v && 'unsigned' in v;
}

function plain(v) {
  if (isLong(v)) return v.toString();
  if (v instanceof Uint8Array) return Buffer.from(v).toString('base64');
  if (Array.isArray(v)) return v.map(plain);
  if (v !== null && typeof v === 'object') {
    const out = {};
    for (const [k, x] of Object.entries(v)) out[k] = plain(x);
    return out;
  }
  return v;
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (!line.trim()) return;
  const { topic, payload } = JSON.parse(line);
  let out;
  try {
    out = { topic, payload: plain(sparkplug.decodePayload(Buffer.from(payload, 'base64'))) };
  } catch (e) {
    out = { topic, error: String(e) };
  }
  process.stdout.write(JSON.stringify(out) + '\n');
});
