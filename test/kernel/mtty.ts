// mtty (samples/vfio-mdev/mtty.c) helpers for the guest tests: create/remove mdevs, and set/read device state
// through the BARs (BAR i = serial port i; registers at the 16550 offsets).
import fs from 'node:fs';
import crypto from 'node:crypto';
import type { KernelVfioDevice } from '../../src/main/reach/kernel/device.js';

const TYPES = '/sys/class/mdev_bus/mtty/mdev_supported_types';
export const UART = { TX: 0, RX: 0, IER: 1, FCR: 2, LCR: 3, MCR: 4, LSR: 5, SCR: 7 } as const;
const LSR_DR = 0x01;

export function createMdev(type: 'mtty-1' | 'mtty-2' = 'mtty-2'): string {
  const uuid = crypto.randomUUID();
  fs.writeFileSync(`${TYPES}/${type}/create`, uuid);
  return `/sys/bus/mdev/devices/${uuid}`;
}

export function removeMdev(sysfs: string): void {
  try { fs.writeFileSync(`${sysfs}/remove`, '1'); } catch { /* already gone */ }
}

/** The state a port carries: registers set to distinctive values and bytes queued in the loopback FIFO. */
export interface PortState { scr: number; lcr: number; mcr: number; fifo: number[] }

export function distinctive(seed: number, ports: number): PortState[] {
  return Array.from({ length: ports }, (_, p) => ({
    scr: (0xa5 + seed * 16 + p) & 0xff,
    lcr: 0x1b ^ p,                  // 8 data bits, 2 stop, even parity; never DLAB (0x80)
    mcr: 0x10 | p,                  // loopback bit + port-specific bit, no OUT2/RTS/DTR (no interrupts)
    fifo: [0x40 + seed, 0x61 + p, 0x7e - seed],
  }));
}

export function writePorts(dev: KernelVfioDevice, st: PortState[]): void {
  st.forEach((s, bar) => {
    dev.regionWrite(bar, UART.SCR, Uint8Array.of(s.scr));
    dev.regionWrite(bar, UART.LCR, Uint8Array.of(s.lcr));
    dev.regionWrite(bar, UART.MCR, Uint8Array.of(s.mcr));
    for (const b of s.fifo) dev.regionWrite(bar, UART.TX, Uint8Array.of(b));
  });
}

/** Read the ports back; draining the FIFO through RX (destructive, like a guest driver would). */
export function readPorts(dev: KernelVfioDevice, ports: number): PortState[] {
  return Array.from({ length: ports }, (_, bar) => {
    const r = (off: number) => dev.regionRead(bar, off, 1)[0]!;
    const s: PortState = { scr: r(UART.SCR), lcr: r(UART.LCR), mcr: r(UART.MCR), fifo: [] };
    for (let i = 0; i < 17 && (r(UART.LSR) & LSR_DR); i++) s.fifo.push(r(UART.RX));
    return s;
  });
}
