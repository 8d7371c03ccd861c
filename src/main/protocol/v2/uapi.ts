// VFIO migration v2 uAPI numbers (include/uapi/linux/vfio.h as of 6.x; ../shared/vfio-facts.md §4, kernel-guest.md).
// Debian 12's 6.1 header lacks PRE_COPY, PRE_COPY_P2P, VFIO_MIG_GET_PRECOPY_INFO and MIG_DATA_SIZE: they are
// defined here and in addon/src/common/vfio_v2.h, whose layouts are static_asserted and exported to the tests.

/** enum vfio_device_mig_state. */
export const V2_STATE = {
  ERROR: 0, STOP: 1, RUNNING: 2, STOP_COPY: 3, RESUMING: 4, RUNNING_P2P: 5, PRE_COPY: 6, PRE_COPY_P2P: 7,
} as const;
export type V2StateName = keyof typeof V2_STATE;
export const V2_STATE_NAMES: readonly V2StateName[] =
  ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'];

/** struct vfio_device_feature_migration.flags */
export const MIGRATION_STOP_COPY = 1 << 0;
export const MIGRATION_P2P = 1 << 1;
export const MIGRATION_PRE_COPY = 1 << 2;

/** VFIO_DEVICE_FEATURE flags and feature indexes (device fd, ioctl 0x3B75). */
export const FEATURE_MASK = 0xffff;
export const FEATURE_GET = 1 << 16;
export const FEATURE_SET = 1 << 17;
export const FEATURE_PROBE = 1 << 18;
export const FEATURE = {
  MIGRATION: 1, MIG_DEVICE_STATE: 2, DMA_LOGGING_START: 6, DMA_LOGGING_STOP: 7, DMA_LOGGING_REPORT: 8, MIG_DATA_SIZE: 9,
} as const;

export const VFIO_DEVICE_FEATURE = 0x3b75;
export const VFIO_MIG_GET_PRECOPY_INFO = 0x3b79;

/** Byte sizes of the structs (argsz values), cross-checked against the addon's static_asserts. */
export const SIZEOF = {
  vfio_device_feature: 8,
  vfio_device_feature_migration: 8,
  vfio_device_feature_mig_state: 8,
  vfio_device_feature_mig_data_size: 8,
  vfio_device_feature_dma_logging_control: 24,
  vfio_device_feature_dma_logging_range: 16,
  vfio_device_feature_dma_logging_report: 32,
  vfio_precopy_info: 24,
} as const;

/** The kernel's limit on DMA logging ranges: PAGE_SIZE / sizeof(range). */
export const DMA_LOGGING_MAX_RANGES = 4096 / 16;
