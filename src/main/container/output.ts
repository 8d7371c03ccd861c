// Output files that never clobber data. A regular-file output is written under a temporary name in the same folder
// and only renamed to its final name once complete, so a failed or interrupted save leaves nothing there. An
// existing file is replaced only with `force`; a file that is also an input (same device and inode) never is. A
// lock next to the final name (a symlink holding the writer's pid, as Emacs locks files) refuses a second writer of
// the same path while the first runs; a lock whose process is gone is taken over.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { ErrorCode, MigError } from '../errors.js';

export interface OutputOptions {
  /** Replace an existing regular file at the final name (never an input). */
  force?: boolean;
  /** Files this operation reads: the output must not be one of them, even with `force`. */
  inputs?: string[];
}

/** '-' names standard output. */
export const STDOUT = '-';

interface Ident { dev: number; ino: number }

function ident(p: string | number): Ident | undefined {
  try {
    const s = typeof p === 'number' ? fs.fstatSync(p) : fs.statSync(p);
    return { dev: s.dev, ino: s.ino };
  } catch {
    return undefined;
  }
}

const same = (a?: Ident, b?: Ident) => !!a && !!b && a.dev === b.dev && a.ino === b.ino;

/** Does `target` (a path or '-') name the same file as standard output? The report must then go elsewhere. */
export function isStdout(target: string): boolean {
  return target === STDOUT || same(ident(target), ident(1));
}

/** Outputs still open when the process exits (a crash, a second signal): their temporary files and locks go. */
const live = new Set<OutputFile>();
/** Complete files that are temporary all the same (`run`'s stream): removed if the process exits first. */
const scratch = new Set<string>();
let exitHook = false;

function hookExit(): void {
  if (exitHook) return;
  exitHook = true;
  process.on('exit', () => {
    for (const o of live) o.discard();
    for (const f of scratch) { try { fs.rmSync(f, { force: true }); } catch { /* best effort */ } }
  });
}

/** Remove `file` at process exit unless `keep` is called first (returned). */
export function removeOnExit(file: string): () => void {
  hookExit();
  scratch.add(file);
  return () => { scratch.delete(file); };
}

export class OutputFile {
  private closed = false;
  private constructor(
    /** Where the data goes: the temporary file, or the target itself when it is not a regular file. */
    readonly fd: number,
    /** The final name (absolute), or '-' for standard output. */
    readonly path: string,
    private readonly temp: string | undefined,
    private readonly lock: string | undefined,
    private readonly force: boolean,
    /** Whether the fd takes positioned writes (a regular file); pipes and terminals are written in order. */
    readonly positional: boolean,
  ) {
    live.add(this);
    hookExit();
  }

  /**
   * Check `target` and open where its data will go. Every refusal happens here, before any byte is written: an input
   * named as the output, an existing file without `force`, another writer of the same path.
   */
  static open(target: string, o: OutputOptions = {}): OutputFile {
    if (typeof target !== 'string' || target === '') throw new MigError(ErrorCode.BAD_ARGUMENT, 'output path must be a non-empty string');
    for (const i of o.inputs ?? []) {
      if (same(ident(i), target === STDOUT ? ident(1) : ident(target))) {
        throw new MigError(ErrorCode.BAD_ARGUMENT, `output ${target} is the input ${i} (the same file): choose another output`);
      }
    }
    if (target === STDOUT) {
      // Standard output as given: a pipe or terminal takes the bytes in order; never a temporary name.
      return new OutputFile(1, STDOUT, undefined, undefined, false, false);
    }
    let final = path.resolve(target);
    let st: fs.Stats | undefined;
    try { st = fs.statSync(final); } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError(`cannot use output ${target}`, e);
    }
    if (st && st.isDirectory()) throw new MigError(ErrorCode.BAD_ARGUMENT, `output ${target} is a directory`);
    if (st && !st.isFile()) {
      // A device, FIFO or socket (/dev/null, a named pipe): written in place, there is nothing to clobber.
      const fd = openOrThrow(final, 'w', target);
      return new OutputFile(fd, final, undefined, undefined, false, positional(fd));
    }
    if (st) {
      if (!o.force) throw new MigError(ErrorCode.OUTPUT_EXISTS, `${target} exists: pass --force (API: force: true) to replace it`);
      final = fs.realpathSync(final); // a symlink keeps pointing at the replaced file
    }
    const dir = path.dirname(final);
    const base = path.basename(final);
    const lock = takeLock(path.join(dir, `.#${base}`), target);
    let fd = -1;
    let temp: string;
    try {
      temp = path.join(dir, `.${base}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.partial`);
      fd = openOrThrow(temp, 'wx', target);
      if (st) fs.fchmodSync(fd, st.mode & 0o7777);
    } catch (e) {
      if (fd >= 0) fs.closeSync(fd);
      releaseLock(lock);
      throw e;
    }
    return new OutputFile(fd, final, temp, lock, !!o.force, true);
  }

  get committed(): boolean { return this.closed; }

  /** Give the data its final name. Without `force`, a file that appeared there meanwhile is not replaced. */
  commit(): void {
    if (this.closed) throw new MigError(ErrorCode.BAD_STATE, `output ${this.path} was already closed`);
    this.closed = true;
    live.delete(this);
    try {
      if (this.fd !== 1) fs.closeSync(this.fd);
      if (!this.temp) return;
      if (this.force) {
        fs.renameSync(this.temp, this.path);
      } else {
        try {
          fs.linkSync(this.temp, this.path); // fails if the name exists: atomic no-clobber
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
            throw new MigError(ErrorCode.OUTPUT_EXISTS, `${this.path} appeared while writing it: not replaced (pass --force to replace it)`);
          }
          throw ioError(`cannot create ${this.path}`, e);
        }
        fs.unlinkSync(this.temp);
      }
    } catch (e) {
      if (this.temp) fs.rmSync(this.temp, { force: true });
      throw e instanceof MigError ? e : ioError(`cannot create ${this.path}`, e);
    } finally {
      releaseLock(this.lock);
    }
  }

  /**
   * Drop what was written: the temporary file goes, the final name is untouched. Never throws. `closeAfter`: a writer
   * may still hold the descriptor (a worker inside a stalled vendor call): the name and the lock go now, the
   * descriptor is closed once it settles, so its number cannot be reused under that writer.
   */
  discard(closeAfter?: Promise<unknown>): void {
    if (this.closed) return;
    this.closed = true;
    live.delete(this);
    const close = () => { try { if (this.fd !== 1) fs.closeSync(this.fd); } catch { /* already closed */ } };
    if (closeAfter) void closeAfter.then(close, close); else close();
    if (this.temp) { try { fs.rmSync(this.temp, { force: true }); } catch { /* nothing more to do */ } }
    releaseLock(this.lock);
  }
}

function ioError(what: string, e: unknown): MigError {
  const ne = e as NodeJS.ErrnoException;
  return new MigError(ErrorCode.IO, `${what}: ${ne?.code ?? ''} ${ne?.message ?? String(e)}`.replace(/\s+/g, ' '), { errno: ne?.errno, cause: e });
}

function openOrThrow(p: string, flags: string, label: string): number {
  try {
    return fs.openSync(p, flags, 0o666);
  } catch (e) {
    throw ioError(`cannot open output ${label}`, e);
  }
}

/** Regular files and devices like /dev/null take pwrite; pipes and sockets answer ESPIPE. */
export function positional(fd: number): boolean {
  if (fs.fstatSync(fd).isFile()) return true;
  try {
    fs.writeSync(fd, new Uint8Array(0), 0, 0, 0);
    return true;
  } catch {
    return false;
  }
}

function alive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function takeLock(lock: string, label: string): string {
  const me = `vfio-mig.${process.pid}`;
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.symlinkSync(me, lock);
      return lock;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(`cannot lock output ${label}`, e);
    }
    let owner = '';
    try { owner = fs.readlinkSync(lock); } catch { /* vanished or not a symlink: retry */ }
    const pid = Number(/^vfio-mig\.(\d+)$/.exec(owner)?.[1]);
    if (alive(pid)) {
      throw new MigError(ErrorCode.OUTPUT_BUSY, `${label} is being written by another vfio-mig (pid ${pid}, lock ${lock})`);
    }
    if (owner && !owner.startsWith('vfio-mig.')) {
      throw new MigError(ErrorCode.OUTPUT_BUSY, `${label}: ${lock} exists and is not a vfio-mig lock; remove it if stale`);
    }
    // Its writer is gone (killed): take the lock over, and drop the partial file that writer left behind.
    fs.rmSync(lock, { force: true });
    removePartials(path.dirname(lock), lock.slice(path.dirname(lock).length + 3), pid);
  }
  throw new MigError(ErrorCode.OUTPUT_BUSY, `${label}: cannot take the lock ${lock}`);
}

function removePartials(dir: string, base: string, pid: number): void {
  if (!Number.isSafeInteger(pid)) return;
  const prefix = `.${base}.${pid}.`;
  try {
    for (const f of fs.readdirSync(dir)) if (f.startsWith(prefix) && f.endsWith('.partial')) fs.rmSync(path.join(dir, f), { force: true });
  } catch { /* best effort */ }
}

function releaseLock(lock: string | undefined): void {
  if (!lock) return;
  try {
    if (fs.readlinkSync(lock) === `vfio-mig.${process.pid}`) fs.unlinkSync(lock);
  } catch { /* already gone */ }
}
