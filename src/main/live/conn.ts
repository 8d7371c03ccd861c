// Connections for live migration: TCP (optionally mutual TLS 1.3), UNIX sockets, inherited fds. TLS material comes
// from one directory with fixed file names (QEMU's x509 dir names); the destination admits a client only if its
// certificate chains to the CA and its identity is on the `allow` list (deny by default).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { ErrorCode, MigError } from '../errors.js';
import { native, type TcpKeepalive } from '../../addon/native.js';
import type { MigUri } from './uri.js';

export const TLS_FILES = {
  ca: 'ca-cert.pem', serverCert: 'server-cert.pem', serverKey: 'server-key.pem', clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem', allow: 'allow',
} as const;

export interface TlsConfig { ca: Buffer; cert: Buffer; key: Buffer; allow: string[]; dir: string }

function readTlsFile(dir: string, name: string): Buffer {
  const p = path.join(dir, name);
  try {
    return fs.readFileSync(p);
  } catch (e) {
    throw new MigError(ErrorCode.TLS, `--tls-dir: cannot read ${p}: ${(e as Error).message}`, { cause: e });
  }
}

/** The destination reads ca/server cert/server key/allow; the source ca/client cert/client key. */
export function loadTlsDir(dir: string, role: 'server' | 'client'): TlsConfig {
  const ca = readTlsFile(dir, TLS_FILES.ca);
  const cert = readTlsFile(dir, role === 'server' ? TLS_FILES.serverCert : TLS_FILES.clientCert);
  const key = readTlsFile(dir, role === 'server' ? TLS_FILES.serverKey : TLS_FILES.clientKey);
  let allow: string[] = [];
  if (role === 'server') {
    allow = readTlsFile(dir, TLS_FILES.allow).toString('utf8').split('\n').map((l) => l.replace(/#.*/, '').trim()).filter(Boolean);
  }
  try {
    tls.createSecureContext({ ca, cert, key }); // bad PEM or a key that does not match its certificate
  } catch (e) {
    throw new MigError(ErrorCode.TLS, `--tls-dir ${dir}: ${(e as Error).message}`, { cause: e });
  }
  return { ca, cert, key, allow, dir };
}

/** The identity a peer certificate presents: its subject CN and its SHA-256 fingerprint. */
export function certIdentity(raw: Buffer): { cn: string; fingerprint: string } {
  const x = new X509Certificate(raw);
  const cn = /(?:^|\n)CN=([^\n]*)/.exec(x.subject)?.[1] ?? '';
  return { cn, fingerprint: x.fingerprint256.toLowerCase() };
}

/** An allow-list line is a subject CN, or `sha256:` and the certificate's fingerprint (hex, colons optional). */
export function allowed(allow: readonly string[], id: { cn: string; fingerprint: string }): boolean {
  const fp = id.fingerprint.replace(/:/g, '');
  return allow.some((l) => l.toLowerCase().startsWith('sha256:')
    ? l.slice(7).replace(/:/g, '').toLowerCase() === fp
    : id.cn !== '' && l === id.cn);
}

function tlsError(e: NodeJS.ErrnoException, what: string): MigError {
  return new MigError(ErrorCode.TLS, `${what}: TLS handshake failed: ${e.code ?? ''} ${e.message}`.trim(), { cause: e });
}

/** A socket error as a MigError: TLS alerts (wrong CA, refused certificate) are TLS, the rest a lost peer. */
export function socketError(e: NodeJS.ErrnoException, what: string): MigError {
  if (e instanceof MigError) return e;
  if (/SSL|TLS|CERT/i.test(e.code ?? '') || /alert|certificate/i.test(e.message)) return tlsError(e, what);
  // TCP_USER_TIMEOUT or keepalive gave up on a silent peer: the kernel's own timeout.
  if (e.code === 'ETIMEDOUT') return new MigError(ErrorCode.PEER_TIMEOUT, `${what}: the peer stopped acknowledging (TCP): ${e.message}`, { cause: e });
  return new MigError(ErrorCode.PEER_GONE, `${what}: ${e.code ?? ''} ${e.message}`.trim(), { cause: e });
}

/**
 * The kernel side of "a peer that vanishes is noticed within a bounded time" (as cloud-hypervisor does): keepalive
 * probes every `keepaliveMs` (whole seconds, at least 1) once the connection is idle that long, as many as fit in
 * `timeoutMs` (1..127), and TCP_USER_TIMEOUT = `timeoutMs` for data the peer never acknowledges. So a host that
 * disappears without a RST is dropped by the kernel within about `timeoutMs`, like the application heartbeat.
 */
export function tcpKeepalive(keepaliveMs: number, timeoutMs: number): TcpKeepalive {
  const idleS = Math.min(32767, Math.max(1, Math.ceil(keepaliveMs / 1000)));
  const count = Math.min(127, Math.max(1, Math.ceil((timeoutMs / 1000 - idleS) / idleS)));
  return { keepalive: true, idleS, intervalS: idleS, count, userTimeoutMs: Math.min(2 ** 31 - 1, Math.max(1, Math.round(timeoutMs))) };
}

/** The file descriptor under a TCP socket, TLS or not (node:tls keeps the TCP handle as its wrap's parent). */
export function socketFd(s: Duplex): number {
  const h = (s as unknown as { _handle?: { fd?: number; _parent?: { fd?: number } } })._handle;
  const fd = h?.fd !== undefined && h.fd >= 0 ? h.fd : h?._parent?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

/** No delay, and the keepalive/user-timeout options set through the addon and checked by reading them back. */
function tune(s: net.Socket, ka: TcpKeepalive, what: string): void {
  s.setNoDelay(true);
  s.setKeepAlive(true, ka.idleS * 1000); // Node's own view; the addon then sets (and checks) every option
  const fd = socketFd(s);
  if (fd < 0) throw new MigError(ErrorCode.IO, `${what}: no file descriptor to set TCP keepalive on`);
  let got: TcpKeepalive;
  try {
    got = native().tcpKeepalive(fd, ka);
  } catch (e) {
    throw new MigError(ErrorCode.IO, `${what}: setting TCP keepalive / TCP_USER_TIMEOUT: ${(e as Error).message}`, { cause: e });
  }
  if (JSON.stringify(got) !== JSON.stringify(ka)) {
    throw new MigError(ErrorCode.IO, `${what}: TCP keepalive reads back ${JSON.stringify(got)}, not ${JSON.stringify(ka)}`);
  }
}

function isTcp(fd: number): boolean {
  try { native().tcpKeepalive(fd, null); return true; } catch { return false; }
}

/** An inherited socket (fd:N) gets the same options when it is TCP; a UNIX socket or a socketpair does not. */
export function tuneInherited(s: net.Socket, fd: number, ka: TcpKeepalive, what: string): void {
  if (isTcp(fd)) tune(s, ka, what);
}

/** Connect one channel. Resolves once the socket (and the TLS handshake, if any) is up. */
export function connect(uri: MigUri, tlsc: TlsConfig | undefined, timeoutMs: number, ka: TcpKeepalive, what: string): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    let s: net.Socket;
    const fail = (e: MigError) => { clearTimeout(timer); s?.destroy(); reject(e); };
    const timer = setTimeout(() => fail(new MigError(ErrorCode.PEER_TIMEOUT, `${what}: no connection to ${uri.text} within ${timeoutMs} ms`)), timeoutMs);
    const ok = () => { clearTimeout(timer); s.removeAllListeners('error'); resolve(s); };
    if (uri.kind === 'tcp') {
      if (tlsc) {
        s = tls.connect({
          host: uri.host || '127.0.0.1', port: uri.port, ca: tlsc.ca, cert: tlsc.cert, key: tlsc.key,
          minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', servername: net.isIP(uri.host) ? undefined : uri.host,
        }, ok);
        s.once('error', (e) => fail(socketError(e, what)));
      } else {
        s = net.connect({ host: uri.host || '127.0.0.1', port: uri.port }, ok);
        s.once('error', (e) => fail(socketError(e, what)));
      }
      // On the TCP connect (before a TLS handshake): the keepalive covers the handshake too.
      s.once('connect', () => { try { tune(s, ka, what); } catch (e) { fail(e as MigError); } });
    } else if (uri.kind === 'unix') {
      if (tlsc) { clearTimeout(timer); reject(new MigError(ErrorCode.BAD_ARGUMENT, 'TLS is for TCP only: a UNIX socket is protected by its file permissions')); return; }
      s = net.connect({ path: uri.path }, ok);
      s.once('error', (e) => fail(socketError(e, what)));
    } else if (uri.kind === 'fd') {
      if (tlsc) { clearTimeout(timer); reject(new MigError(ErrorCode.BAD_ARGUMENT, 'TLS is for tcp: URIs only')); return; }
      try {
        s = new net.Socket({ fd: uri.fd, readable: true, writable: true });
        tuneInherited(s, uri.fd, ka, what);
      } catch (e) {
        clearTimeout(timer);
        reject(e instanceof MigError ? e : new MigError(ErrorCode.BAD_ARGUMENT, `${uri.text}: ${(e as Error).message}`, { cause: e }));
        return;
      }
      ok();
    } else {
      clearTimeout(timer);
      reject(new MigError(ErrorCode.BAD_ARGUMENT, `${uri.text}: not a network URI`));
    }
  });
}

export interface Listener { address: string; close(): void }

/**
 * Listen and hand every accepted connection (after the TLS handshake and the allow-list check) to `onConn`.
 * Rejected clients go to `onReject` and the listener stays up: a stray or hostile client cannot end an incoming
 * migration.
 */
export function listen(uri: MigUri, tlsc: TlsConfig | undefined, ka: TcpKeepalive,
  onConn: (s: Duplex, peer: { address: string; identity?: { cn: string; fingerprint: string } }) => void,
  onReject: (why: MigError, address: string) => void): Promise<Listener> {
  return new Promise((resolve, reject) => {
    let server: net.Server;
    const peerAddr = (s: net.Socket) => (s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : 'local');
    if (uri.kind === 'tcp' && tlsc) {
      server = tls.createServer({
        ca: tlsc.ca, cert: tlsc.cert, key: tlsc.key, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3',
        maxVersion: 'TLSv1.3',
      }, (s) => {
        const raw = s.getPeerX509Certificate?.()?.raw;
        const id = raw ? certIdentity(raw) : { cn: '', fingerprint: '' };
        onConn(s, { address: peerAddr(s), identity: id });
      });
      server.on('tlsClientError', (e, s) => onReject(tlsError(e, 'incoming connection'), peerAddr(s)));
    } else if (uri.kind === 'tcp' || uri.kind === 'unix') {
      if (tlsc && uri.kind === 'unix') {
        reject(new MigError(ErrorCode.BAD_ARGUMENT, 'TLS is for TCP only: a UNIX socket is protected by its file permissions'));
        return;
      }
      server = net.createServer((s) => onConn(s, { address: peerAddr(s) }));
    } else {
      reject(new MigError(ErrorCode.BAD_ARGUMENT, `${uri.text}: cannot listen on this URI`));
      return;
    }
    // Every accepted TCP connection, before any TLS handshake: the keepalive covers the handshake too.
    if (uri.kind === 'tcp') {
      server.on('connection', (s: net.Socket) => {
        try { tune(s, ka, 'incoming connection'); } catch (e) { onReject(e as MigError, peerAddr(s)); s.destroy(); }
      });
    }
    server.once('error', (e: NodeJS.ErrnoException) => reject(new MigError(ErrorCode.IO, `cannot listen on ${uri.text}: ${e.message}`, { cause: e })));
    const done = () => {
      server.removeAllListeners('error');
      server.on('error', () => undefined);
      const a = server.address();
      const address = typeof a === 'string' ? `unix:${a}` : a ? `tcp:${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : uri.text;
      resolve({
        address,
        close: () => {
          server.close();
          if (uri.kind === 'unix') fs.rmSync(uri.path, { force: true });
        },
      });
    };
    if (uri.kind === 'unix') server.listen(uri.path, done);
    else server.listen(uri.port, uri.host || undefined, done);
  });
}
