// Where the stream goes. A regular file takes positioned writes, several in flight (each record's position is fixed
// when it is queued, so completion order does not matter); anything else (a pipe, /dev/null, later a socket) gets the
// writes one after another. Future transports (TCP/UNIX/TLS) implement the same two methods.
import fs from 'node:fs';
import { ErrorCode, MigError } from '../errors.js';
import { OutputFile, STDOUT, positional, type OutputOptions } from './output.js';
import { NO_DEVICE, RECORD_HEADER_SIZE, REC_ABORT, writeRecordHeader } from './format.js';

export interface Sink {
  write(b: Uint8Array): Promise<void>;
  close(): Promise<void>;
  readonly bytes: number;
  /** For sinks that take positioned writes: what lets a worker write a staged record straight to the fd. */
  direct?(): DirectTarget | null;
}

/**
 * A positioned sink shared with workers: `counters` is a BigInt64Array over shared memory, [0] = next free file
 * position (reserved with Atomics.add, so records never overlap and each device's records stay in its order).
 */
export interface DirectTarget { fd: number; counters: SharedArrayBuffer }

/** Reserve `len` bytes of the file (worker side of DirectTarget); call in the device's record order. */
export function reservePosition(d: DirectTarget, len: number): number {
  return Number(Atomics.add(new BigInt64Array(d.counters), 0, BigInt(len)));
}

/**
 * A worker failed after reserving [pos, pos+len): fill the hole with an ABORT record (JSON padded with spaces), so a
 * reader meets the abort there instead of garbage.
 */
export function fillHole(d: DirectTarget, pos: number, len: number, code: string): void {
  const bodyLen = len - RECORD_HEADER_SIZE;
  let json = JSON.stringify({ code, message: 'a worker failed while writing this record' });
  if (json.length > bodyLen) json = JSON.stringify({ code }).length <= bodyLen ? JSON.stringify({ code }) : '{}';
  const rec = new Uint8Array(len);
  rec.fill(0x20, RECORD_HEADER_SIZE);
  rec.set(Buffer.from(json), RECORD_HEADER_SIZE);
  writeRecordHeader(rec, REC_ABORT, NO_DEVICE, 0n, 0n, rec.subarray(RECORD_HEADER_SIZE));
  try { writeAt(d, rec, len, pos); } catch { /* the sink itself failed: nothing more to do */ }
}

/** Write `len` bytes of `buf` at a reserved position. */
export function writeAt(d: DirectTarget, buf: Uint8Array, len: number, pos: number): void {
  let done = 0;
  try {
    while (done < len) done += fs.writeSync(d.fd, buf, done, len - done, pos + done);
  } catch (e) {
    throw new MigError(ErrorCode.IO, `stream write failed: ${(e as Error).message}`, { offset: pos + done, cause: e });
  }
}

function writeAll(fd: number, b: Uint8Array, pos: number | null): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = () => {
      fs.write(fd, b, done, b.length - done, pos === null ? null : pos + done, (err, n) => {
        if (err) return reject(new MigError(ErrorCode.IO, `stream write failed: ${err.message}`, { offset: (pos ?? 0) + done, cause: err }));
        done += n;
        if (done < b.length) step(); else resolve();
      });
    };
    step();
  });
}

export class FileSink implements Sink {
  private readonly counters = new SharedArrayBuffer(16);
  private readonly c = new BigInt64Array(this.counters);
  private chain: Promise<void> = Promise.resolve();
  private constructor(private fd: number, private readonly positional: boolean, readonly path: string, private readonly ownsFd: boolean) {}

  /**
   * Open `path` for writing in place. An existing regular file is refused unless `force` (then truncated): for a
   * save that must never leave a partial file at its final name, use `OutputFile` (what `saveDevices` does).
   */
  static open(path: string, o: { force?: boolean } = {}): FileSink {
    let fd: number;
    try {
      fd = fs.openSync(path, o.force ? 'w' : 'wx');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
        // Devices (/dev/null) and FIFOs hold no data to clobber.
        if (!fs.statSync(path).isFile()) return FileSink.open(path, { force: true });
        throw new MigError(ErrorCode.OUTPUT_EXISTS, `${path} exists: pass force to replace it`);
      }
      throw new MigError(ErrorCode.IO, `cannot open stream ${path}: ${(e as Error).message}`, { cause: e });
    }
    return new FileSink(fd, positional(fd), path, true);
  }

  /** Write into an output the caller commits or discards (the sink never closes its descriptor). */
  static onOutput(out: OutputFile): Sink {
    if (out.path === STDOUT) return new WritableSink(process.stdout, STDOUT);
    return new FileSink(out.fd, out.positional, out.path, false);
  }

  get bytes(): number { return Number(Atomics.load(this.c, 0)); }

  direct(): DirectTarget | null {
    return this.positional && this.fd >= 0 ? { fd: this.fd, counters: this.counters } : null;
  }

  write(b: Uint8Array): Promise<void> {
    const pos = Number(Atomics.add(this.c, 0, BigInt(b.length)));
    if (this.positional) return writeAll(this.fd, b, pos);
    const p = this.chain.then(() => writeAll(this.fd, b, null));
    this.chain = p.catch(() => undefined);
    return p;
  }

  async close(): Promise<void> {
    await this.chain;
    if (this.fd >= 0 && this.ownsFd) fs.closeSync(this.fd);
    this.fd = -1;
  }
}

/**
 * Standard output (a pipe, a terminal, a file the shell opened): written in order through its stream, which knows
 * how to wait on a full non-blocking pipe. Never positional, so records go through the main thread's ring.
 */
export class WritableSink implements Sink {
  private n = 0;
  private chain: Promise<void> = Promise.resolve();
  constructor(private readonly w: NodeJS.WritableStream, readonly path: string) {}
  get bytes(): number { return this.n; }
  write(b: Uint8Array): Promise<void> {
    this.n += b.length;
    const p = this.chain.then(() => new Promise<void>((resolve, reject) => {
      // The stream may keep the bytes until it flushes them; callers reuse their buffers once this resolves.
      this.w.write(Buffer.from(b), (err) => {
        if (err) reject(new MigError(ErrorCode.IO, `write to ${this.path === STDOUT ? 'standard output' : this.path} failed: ${err.message}`, { cause: err }));
        else resolve();
      });
    }));
    this.chain = p.catch(() => undefined);
    return p;
  }
  async close(): Promise<void> { await this.chain; }
}

export { OutputFile, type OutputOptions };
