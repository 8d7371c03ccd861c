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
  return new MigError(ErrorCode.PEER_GONE, `${what}: ${e.code ?? ''} ${e.message}`.trim(), { cause: e });
}

function tune(s: net.Socket, keepaliveMs: number): void {
  s.setNoDelay(true);
  // Notices a vanished host (no RST) at the kernel level too; the application heartbeat bounds the rest.
  s.setKeepAlive(true, keepaliveMs);
}

/** Connect one channel. Resolves once the socket (and the TLS handshake, if any) is up. */
export function connect(uri: MigUri, tlsc: TlsConfig | undefined, timeoutMs: number, keepaliveMs: number, what: string): Promise<Duplex> {
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
      tune(s, keepaliveMs);
    } else if (uri.kind === 'unix') {
      if (tlsc) { clearTimeout(timer); reject(new MigError(ErrorCode.BAD_ARGUMENT, 'TLS is for TCP only: a UNIX socket is protected by its file permissions')); return; }
      s = net.connect({ path: uri.path }, ok);
      s.once('error', (e) => fail(socketError(e, what)));
    } else if (uri.kind === 'fd') {
      if (tlsc) { clearTimeout(timer); reject(new MigError(ErrorCode.BAD_ARGUMENT, 'TLS is for tcp: URIs only')); return; }
      try {
        s = new net.Socket({ fd: uri.fd, readable: true, writable: true });
      } catch (e) {
        clearTimeout(timer);
        reject(new MigError(ErrorCode.BAD_ARGUMENT, `${uri.text}: ${(e as Error).message}`, { cause: e }));
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
export function listen(uri: MigUri, tlsc: TlsConfig | undefined, keepaliveMs: number,
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
        tune(s, keepaliveMs);
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
      server = net.createServer((s) => { if (uri.kind === 'tcp') tune(s, keepaliveMs); onConn(s, { address: peerAddr(s) }); });
    } else {
      reject(new MigError(ErrorCode.BAD_ARGUMENT, `${uri.text}: cannot listen on this URI`));
      return;
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
