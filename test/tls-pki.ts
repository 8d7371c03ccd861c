// A throw-away PKI for the TLS tests, made with the openssl CLI (Debian's openssl package): a CA, a destination
// certificate for the given IPs, an allowed client, a client the CA signed but the allow list does not name, and a
// client from another CA. Each role gets a --tls-dir with the fixed file names.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface Pki { root: string; server: string; client: string; intruder: string; wrongCa: string; allowedCn: string }

function ossl(cwd: string, ...args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function ca(dir: string, cn: string): void {
  ossl(dir, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem',
    '-days', '2', '-subj', `/CN=${cn}`);
}

function leaf(caDir: string, outDir: string, base: string, cn: string, san?: string): void {
  const key = path.join(outDir, `${base}-key.pem`);
  const csr = path.join(outDir, `${base}.csr`);
  const ext = path.join(outDir, `${base}.ext`);
  fs.writeFileSync(ext, san ? `subjectAltName=${san}\n` : 'basicConstraints=CA:FALSE\n');
  ossl(outDir, 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`);
  ossl(caDir, 'x509', '-req', '-in', csr, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out',
    path.join(outDir, `${base}-cert.pem`), '-days', '2', '-extfile', ext);
  fs.rmSync(csr);
  fs.rmSync(ext);
}

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
