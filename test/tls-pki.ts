// A throw-away PKI for the TLS tests, made with the openssl CLI (src/main/live/pki.ts's pieces): a CA, a destination
// certificate for the given IPs, an allowed client, a client the CA signed but the allow list does not name, and a
// client from another CA. Each role gets a --tls-dir with the fixed file names.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'uvu';
import { makeCa as ca, makeLeaf as leaf } from '../src/main/live/pki.js';

export interface Pki { root: string; server: string; client: string; intruder: string; wrongCa: string; allowedCn: string }

export function opensslAvailable(): boolean {
  try { execFileSync('openssl', ['version'], { stdio: 'ignore' }); return true; } catch { return false; }
}

export function makePki(ips: string[] = ['127.0.0.1']): Pki {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vfm-pki-'));
  const d = (n: string) => { const p = path.join(root, n); fs.mkdirSync(p); return p; };
  const caDir = d('ca');
  const otherCa = d('other-ca');
  ca(caDir, 'vfio-mig test CA');
  ca(otherCa, 'some other CA');
  const server = d('server');
  const client = d('client');
  const intruder = d('intruder');
  const wrongCa = d('wrong-ca');
  leaf(caDir, server, 'server', 'destination', [...ips.map((i) => `IP:${i}`), 'DNS:localhost'].join(','));
  leaf(caDir, client, 'client', 'source-host-a');
  leaf(caDir, intruder, 'client', 'source-host-b');
  leaf(otherCa, wrongCa, 'client', 'source-host-a');
  for (const dir of [server, client, intruder]) fs.copyFileSync(path.join(caDir, 'ca-cert.pem'), path.join(dir, 'ca-cert.pem'));
  // Trusts the right CA but presents a certificate of another one: the destination must be the one to say no.
  fs.copyFileSync(path.join(caDir, 'ca-cert.pem'), path.join(wrongCa, 'ca-cert.pem'));
  fs.writeFileSync(path.join(server, 'allow'), '# clients allowed to migrate into this host\nsource-host-a\n');
  return { root, server, client, intruder, wrongCa, allowedCn: 'source-host-a' };
}

/**
 * The TLS test files' fixture: a PKI made before suite `t` runs (the openssl CLI is required) and removed after it.
 * The object is filled in by the before hook.
 */
export function usePki(t: Test): Pki {
  const pki = {} as Pki;
  t.before(() => {
    if (!opensslAvailable()) throw new Error('the TLS tests need the openssl CLI (Debian package openssl; .ci/run installs it)');
    Object.assign(pki, makePki());
  });
  t.after(() => { if (pki.root) fs.rmSync(pki.root, { recursive: true, force: true }); });
  return pki;
}
