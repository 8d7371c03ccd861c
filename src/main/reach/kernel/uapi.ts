// VFIO migration v2 uAPI values (Linux 6.12 include/uapi/linux/vfio.h; vfio-facts §4). The addon static_asserts
// the same values against <linux/vfio.h> where the build machine's header has them, and exports them as
// uapiLayout() so test/kernel-reach.test.ts cross-checks this table.
export const V2State = {
  ERROR: 0, STOP: 1, RUNNING: 2, STOP_COPY: 3, RESUMING: 4, RUNNING_P2P: 5, PRE_COPY: 6, PRE_COPY_P2P: 7,
} as const;
export type V2State = (typeof V2State)[keyof typeof V2State];
export const V2_STATE_NAMES = ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'] as const;
export const v2StateName = (s: number): string => V2_STATE_NAMES[s] ?? `state ${s}`;

/** VFIO_DEVICE_FEATURE_MIGRATION flags. */
export const MigFlag = { STOP_COPY: 1, P2P: 2, PRE_COPY: 4 } as const;
/** VFIO_DEVICE_FEATURE ids and op bits. */
export const Feature = {
  MIGRATION: 1, MIG_DEVICE_STATE: 2, DMA_LOGGING_START: 6, DMA_LOGGING_STOP: 7, DMA_LOGGING_REPORT: 8, MIG_DATA_SIZE: 9,
  GET: 1 << 16, SET: 1 << 17, PROBE: 1 << 18,
} as const;

/** VFIO PCI region indexes and the offset of region i in the device fd (vfio-pci and mtty: i << 40). */
export const PCI_CONFIG_REGION_INDEX = 7;
