// Where the stream goes. A regular file takes positioned writes, several in flight (each record's position is fixed
// when it is queued, so completion order does not matter); anything else (a pipe, /dev/null, later a socket) gets the
// writes one after another. Future transports (TCP/UNIX/TLS) implement the same two methods.
import fs from 'node:fs';
import { ErrorCode, MigError } from '../errors.js';

export interface Sink {
  write(b: Uint8Array): Promise<void>;
  close(): Promise<void>;
  readonly bytes: number;
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
  private pos = 0;
  private chain: Promise<void> = Promise.resolve();
  private constructor(private fd: number, private readonly positional: boolean, readonly path: string) {}

  static open(path: string): FileSink {
    let fd: number;
    try {
      fd = fs.openSync(path, 'w');
    } catch (e) {
      throw new MigError(ErrorCode.IO, `cannot open stream ${path}: ${(e as Error).message}`, { cause: e });
    }
    return new FileSink(fd, fs.fstatSync(fd).isFile(), path);
  }

  get bytes(): number { return this.pos; }

  write(b: Uint8Array): Promise<void> {
    const pos = this.pos;
    this.pos += b.length;
    if (this.positional) return writeAll(this.fd, b, pos);
    const p = this.chain.then(() => writeAll(this.fd, b, null));
    this.chain = p.catch(() => undefined);
    return p;
  }

  async close(): Promise<void> {
    await this.chain;
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}
