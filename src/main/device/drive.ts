// One code path for a device whose operations answer now (in-process, ioctls) or later (a socket): protocol logic is
// written as a generator that yields each operation's Awaitable result and gets the value back. drive() runs it
// synchronously while every yielded value is plain — no extra tick for kernel and emulated devices — and goes on
// asynchronously from the first Promise, so a device reached over vfio-user never blocks the main thread. A rejected
// Promise is thrown into the generator at its yield, where the protocol's own try/catch handles it like a sync throw.
import type { Awaitable } from './seam.js';

/** A protocol step: yields operation results, returns T. `any` in: each yield gets back its own operation's value. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Step<T> = Generator<unknown, T, any>;

export function drive<T>(g: Step<T>): Awaitable<T> {
  let r = g.next();
  while (!r.done) {
    if (r.value instanceof Promise) return resume(g, r.value);
    r = g.next(r.value);
  }
  return r.value;
}

async function resume<T>(g: Step<T>, first: Promise<unknown>): Promise<T> {
  let p: Promise<unknown> = first;
  for (;;) {
    let v: unknown;
    let failed = false;
    let err: unknown;
    try { v = await p; } catch (e) { failed = true; err = e; }
    let r = failed ? g.throw(err) : g.next(v);
    while (!r.done && !(r.value instanceof Promise)) r = g.next(r.value);
    if (r.done) return r.value;
    p = r.value as Promise<unknown>;
  }
}
