// Text that came from a stream file or a vendor (device names, ABORT messages, vendor errors) is printed escaped: no
// control character, ANSI escape sequence or bidirectional override reaches the terminal, so a crafted device name
// cannot draw a fake line such as a green `verified: true`.

// C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), the line/paragraph separators and the bidi controls.
// eslint-disable-next-line no-control-regex
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\\]/g;

function esc(c: string): string {
  if (c === '\\') return '\\\\';
  const n = c.charCodeAt(0);
  return n <= 0xff ? `\\x${n.toString(16).padStart(2, '0')}` : `\\u{${n.toString(16)}}`;
}

/** One printable line: every unsafe character as a visible escape (`\x1b`, `\x0a`, `\u{202e}`, `\\`). */
export function printable(s: unknown): string {
  return String(s).replace(UNSAFE, esc);
}

/**
 * Multi-line text built by the CLI: newlines stay (they are the CLI's own), every other unsafe character is escaped.
 * Fields from outside must still go through `printable` first, or an embedded newline could start a fake line.
 */
export function printableLines(s: string): string {
  return s.split('\n').map((l) => l.replace(UNSAFE, (c) => (c === '\\' ? c : esc(c)))).join('\n');
}

// JSON.stringify escapes C0 but leaves DEL, C1 and the bidi controls raw; \u escapes keep the JSON valid.
// eslint-disable-next-line no-control-regex
const JSON_UNSAFE = /[\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** JSON.stringify whose output holds no raw control or bidi character. */
export function safeJson(v: unknown, indent?: number): string {
  return JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x), indent)
    .replace(JSON_UNSAFE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
