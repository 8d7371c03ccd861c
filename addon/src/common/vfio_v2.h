// VFIO migration v2 uAPI pieces newer than the build machines' 6.1 <linux/vfio.h> (values from Linux 6.12
// include/uapi/linux/vfio.h; vfio-facts §4, kernel-guest.md), for the emulated v2 vendor. The kernel reach
// (addon/src/vfio/v2.cc) defines the same numbers for its ioctls; both are static_asserted and test/v2-*.test.ts
// compares them with src/main/protocol/v2/uapi.ts.
#pragma once
#include <linux/vfio.h>

#include <cstddef>
#include <cstdint>

namespace v2uapi {
constexpr uint32_t kStateError = 0, kStateStop = 1, kStateRunning = 2, kStateStopCopy = 3, kStateResuming = 4,
                   kStateRunningP2P = 5, kStatePreCopy = 6, kStatePreCopyP2P = 7, kNumStates = 8;
constexpr uint32_t kMigStopCopy = 1u << 0, kMigP2P = 1u << 1, kMigPreCopy = 1u << 2;
constexpr uint32_t kFeatureMigDataSize = 9;
struct PrecopyInfo { uint32_t argsz, flags; alignas(8) uint64_t initial_bytes; alignas(8) uint64_t dirty_bytes; };
struct MigDataSize { alignas(8) uint64_t stop_copy_length; };
static_assert(sizeof(PrecopyInfo) == 24 && offsetof(PrecopyInfo, initial_bytes) == 8 && offsetof(PrecopyInfo, dirty_bytes) == 16,
              "struct vfio_precopy_info");
static_assert(sizeof(MigDataSize) == 8, "struct vfio_device_feature_mig_data_size");
// What the 6.1 header has must agree with the local numbers.
static_assert(VFIO_DEVICE_STATE_ERROR == kStateError && VFIO_DEVICE_STATE_STOP == kStateStop &&
                  VFIO_DEVICE_STATE_RUNNING == kStateRunning && VFIO_DEVICE_STATE_STOP_COPY == kStateStopCopy &&
                  VFIO_DEVICE_STATE_RESUMING == kStateResuming && VFIO_DEVICE_STATE_RUNNING_P2P == kStateRunningP2P,
              "enum vfio_device_mig_state");
static_assert(VFIO_MIGRATION_STOP_COPY == kMigStopCopy && VFIO_MIGRATION_P2P == kMigP2P, "migration flags");
static_assert(VFIO_DEVICE_FEATURE_MIGRATION == 1 && VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 2 &&
                  VFIO_DEVICE_FEATURE_DMA_LOGGING_START == 6 && VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP == 7 &&
                  VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT == 8,
              "feature ids");

// vfio_mig_get_next_state as the kernel computes it (the emulated device plays the kernel's role). The same table
// is src/main/protocol/v2/fsm.ts; test/v2-emulated.test.ts compares them on every (flags, current, target).
uint32_t nextState(uint32_t flags, uint32_t cur, uint32_t target);  // kStateError if refused
bool supports(uint32_t flags, uint32_t state);
}  // namespace v2uapi
