// Migration URIs as QEMU and cloud-hypervisor spell them: tcp:HOST:PORT, unix:PATH, fd:N, file:PATH.
import { ErrorCode, MigError } from '../errors.js';

export type MigUri =
  | { kind: 'tcp'; host: string; port: number; text: string }
  | { kind: 'unix'; path: string; text: string }
  | { kind: 'fd'; fd: number; text: string }
  | { kind: 'file'; path: string; text: string };

export function parseUri(text: string, flag = 'URI'): MigUri {
  const bad = (why: string) => new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${text}' ${why} (tcp:HOST:PORT, unix:PATH, fd:N or file:PATH)`);
  const i = text.indexOf(':');
  if (i < 0) throw bad('has no scheme');
  const scheme = text.slice(0, i);
  const rest = text.slice(i + 1);
  switch (scheme) {
    case 'tcp': {
      // tcp:[::1]:4444 or tcp:127.0.0.1:4444 or tcp:host:4444; an empty host listens on every address.
      const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(rest);
      if (!m) throw bad('is not tcp:HOST:PORT');
      const port = Number(m[3]);
      if (port > 65535) throw bad(`has port ${port} (0..65535)`);
      return { kind: 'tcp', host: m[1] ?? m[2], port, text };
    }
    case 'unix':
      if (!rest) throw bad('has no path');
      if (Buffer.byteLength(rest) > 107) throw bad('has a path longer than a UNIX socket address allows (107 bytes)');
      return { kind: 'unix', path: rest, text };
    case 'fd': {
      if (!/^\d{1,9}$/.test(rest)) throw bad('has no file descriptor number');
      return { kind: 'fd', fd: Number(rest), text };
    }
    case 'file':
      if (!rest) throw bad('has no path');
      return { kind: 'file', path: rest, text };
    default:
      throw bad(`has unknown scheme '${scheme}'`);
  }
}
