// A throw-away PKI made with the openssl command (Debian's openssl package): a CA and leaf certificates signed by it,
// written with the fixed --tls-dir file names (conn.ts TLS_FILES). `run --live --tls` uses it for its demo; the TLS
// tests build their wrong-CA and not-allowed clients from the same pieces. Nothing here is for production keys.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ErrorCode, MigError } from '../errors.js';
import { TLS_FILES } from './conn.js';

function ossl(cwd: string, ...args: string[]): void {
  try {
    execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'], timeout: 30_000 });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: Buffer };
    const why = err.code === 'ENOENT' ? 'the openssl command is not installed' : (err.stderr?.toString().trim() || err.message);
    throw new MigError(ErrorCode.TLS, `making a throw-away PKI with openssl ${args[0]}: ${why}`, { cause: e });
  }
}

/** A self-signed CA (P-256) in `dir`: ca-cert.pem and ca-key.pem. */
export function makeCa(dir: string, cn: string): void {
  ossl(dir, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca-key.pem', '-out', TLS_FILES.ca,
    '-days', '2', '-subj', `/CN=${cn}`);
}

/** `<base>-cert.pem` and `<base>-key.pem` in `outDir`, signed by the CA in `caDir`; `san` e.g. `IP:127.0.0.1,DNS:localhost`. */
export function makeLeaf(caDir: string, outDir: string, base: string, cn: string, san?: string): void {
  const key = path.join(outDir, `${base}-key.pem`);
  const csr = path.join(outDir, `${base}.csr`);
  const ext = path.join(outDir, `${base}.ext`);
  fs.writeFileSync(ext, san ? `subjectAltName=${san}\n` : 'basicConstraints=CA:FALSE\n');
  try {
    ossl(outDir, 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`);
    ossl(caDir, 'x509', '-req', '-in', csr, '-CA', TLS_FILES.ca, '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out',
      path.join(outDir, `${base}-cert.pem`), '-days', '2', '-extfile', ext);
  } finally {
    fs.rmSync(csr, { force: true });
    fs.rmSync(ext, { force: true });
  }
}

/** The client identity a throw-away PKI admits. */
export const DEMO_CLIENT_CN = 'vfio-mig-run-live';

/**
 * One folder that serves as --tls-dir for both ends on this machine: a fresh CA, a destination certificate for
 * 127.0.0.1 / localhost, a client certificate (CN vfio-mig-run-live) and an allow list naming it. The CA key is
 * deleted once the certificates are signed. The caller removes the folder.
 */
export function makeThrowawayPki(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-pki-'));
  try {
    fs.chmodSync(dir, 0o700);
    makeCa(dir, 'vfio-mig throw-away CA');
    makeLeaf(dir, dir, 'server', 'destination', 'IP:127.0.0.1,DNS:localhost');
    makeLeaf(dir, dir, 'client', DEMO_CLIENT_CN);
    fs.writeFileSync(path.join(dir, TLS_FILES.allow), `# made by vfio-mig run --live --tls\n${DEMO_CLIENT_CN}\n`);
    for (const f of ['ca-key.pem', 'ca-cert.srl']) fs.rmSync(path.join(dir, f), { force: true });
    return dir;
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}
