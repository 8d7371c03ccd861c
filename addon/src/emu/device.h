// The emulated VFIO migration-v1 vendor device (docs/EMULATED-DEVICE.md).
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace emu {

enum Profile : uint32_t { kDraft2019 = 0, kLinux58 = 1, kV2 = 2 };
enum DataMode : uint32_t { kModeMmap = 0, kModeTrapped = 1, kModeMixed = 2 };
enum OffsetPolicy : uint32_t { kFixed = 0, kMoving = 1 };
enum class Fault {
  kNone, kFailTransition, kErrorOnTransition, kBadDataOffset, kHugeDataOffset, kBadDataSize, kStuck, kEioOnChunk,
  kBadCopiedPfns, kSlowChunk, kOverEstimate, kUpperBoundPending, kWedged
};
bool parseFault(const std::string& s, Fault* out);
// The faults the v2 vendor implements (v2.cc); the others name v1 registers or v1 estimates and mean nothing there.
bool v2Implements(Fault f);

constexpr uint64_t kPage = 4096;
constexpr uint64_t kDataStart = 4096;       // data area starts at region offset 4096
constexpr uint32_t kRegionIndex = 9;        // first device-specific PCI region index
constexpr uint32_t kNumRegions = 10;
constexpr uint32_t kNumIrqs = 5;
constexpr uint32_t kDeviceFlags = 3;        // VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
constexpr uint32_t kRunning = 1, kSaving = 2, kResuming = 4, kStateMask = 7;

struct Config {
  uint32_t profile;
  uint64_t stateSize;
  uint32_t seed;
  bool zeroFill;
  uint64_t maxChunk;
  uint32_t dataMode;
  uint32_t offsetPolicy;
  double dirtyRate;
  uint64_t guestPages;
  double dmaRate;
  uint32_t reservedBits;
  uint32_t migFlags;  // kV2: VFIO_MIGRATION_* flags advertised (STOP_COPY required)
  uint64_t dataArea;  // v1: data area bytes (page multiple); 0 = round_up(2 x maxChunk). Chunks are at most this big.
};

struct Area { uint64_t offset, size; };

struct Info {
  uint32_t id, profile;
  uint64_t stateSize, maxChunk, dataAreaOffset, dataAreaSize, regionSize;
  uint32_t deviceState;
  uint64_t chunksStaged, chunksConsumed, pagesSent, pagesLoaded, workloadWrites, dmaWrites;
  std::string lastError;
};

// Text of the last failing vendor access made by *this thread* (exact, unlike the shared lastError).
const std::string& threadErrorText();

uint64_t splitmix64(uint64_t x);

class Device {
 public:
  Device(uint32_t id, const Config& cfg);  // throws vm::NativeError
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  // Leaves the shared workload pool; later accesses fail ENODEV. Never waits for a vendor access in progress.
  // Memory stays mapped until the last reference goes.
  void shutdown();

  // One workload step (called by the shared workload pool, addon/src/emu/workload.cc): skips the step when a vendor
  // access holds the device, so one slow device never delays the others.
  void workloadTick(std::chrono::steady_clock::time_point now);

  // A trapped region access (read/write on the device fd). Returns 0 or -errno (text in threadErrorText()).
  int access(bool write, uint64_t off, void* buf, size_t len);

  const Config& config() const { return cfg_; }
  uint64_t regionSize() const { return regionSize_; }
  const std::vector<Area>& areas() const { return areas_; }
  int dataFd() const { return dataFd_; }  // laid out like the region: area at fd offset == region offset

  Info info();
  std::vector<uint8_t> regionInfo(uint32_t index) const;  // throws EINVAL for a bad index
  void reset();
  void setFault(Fault f, uint64_t arg);
  void setStrictTrapped(bool on);  // refuse trapped data accesses other than naturally aligned 1/2/4/8 bytes
  void readState(uint64_t off, uint8_t* dst, size_t len);
  void touch(uint64_t off, uint8_t value);
  void configRead(uint8_t* dst);
  void configWrite(const uint8_t* src);
  void dmaTouch(uint64_t page);
  // Emulated VFIO_IOMMU_DIRTY_PAGES on the container (linux-5.8). Throws vm::NativeError.
  void dirtyPages(uint32_t op, uint64_t iova, uint64_t size, uint64_t pgsize, uint8_t* bitmap, size_t bitmapLen);

  // ---- VFIO migration v2 (profile kV2, addon/src/emu/v2.cc): what VFIO_DEVICE_FEATURE and the data fd do on a
  // kernel v2 driver. All throw vm::NativeError with the errno the kernel would return.
  uint64_t v2MigrationFlags();                        // GET MIGRATION (ENOTTY unless kV2)
  bool v2Probe(uint32_t feature);                     // PROBE: the feature exists on this device
  uint32_t v2GetState();                              // GET MIG_DEVICE_STATE
  int v2SetState(uint32_t target);                    // SET MIG_DEVICE_STATE: a new data fd or -1
  void v2PrecopyInfo(int dataFd, uint64_t* initialBytes, uint64_t* dirtyBytes);  // VFIO_MIG_GET_PRECOPY_INFO
  uint64_t v2DataSize();                              // GET MIG_DATA_SIZE
  struct Range { uint64_t iova, length; };
  uint64_t v2DmaStart(uint64_t pageSize, const std::vector<Range>& ranges);  // returns the page size used
  void v2DmaStop();
  void v2DmaReport(uint64_t iova, uint64_t length, uint64_t pageSize, uint8_t* bitmap, size_t bitmapLen);
  // Vendor I/O thread: the data pipe of session `gen` is ready (EPOLLOUT on a save pipe, EPOLLIN on a resume one).
  void v2Pump(uint32_t gen);

 private:
  struct SaveSession {
    bool active = false, headerSent = false, endSent = false, staged = false, consumed = false, frozen = false;
    uint32_t seq = 0;
    uint64_t k = 0, cursor = 0, stagedOff = 0, stagedSize = 0, stagedIdx = 0, pagesSent = 0, frozenPending = 0;
  };
  struct ResumeSession {
    bool active = false, sawHeader = false, sawEnd = false, poisoned = false, waiting = false;
    uint32_t seq = 0;
    uint64_t k = 0, pages = 0, waitOff = 0, waitSize = 0, trapped = 0, coveredBytes = 0;
    // The record in progress across data_size writes (a user may split a record anywhere, as QEMU's
    // vfio_load_buffer does when the destination's data area is smaller than the source's): its head so far, and the
    // PAGES payload bytes still to come with the state offset they go to.
    uint8_t head[48] = {};
    uint64_t headLen = 0, payLeft = 0, payAt = 0;
    std::map<uint64_t, uint64_t> covered;  // trapped byte ranges of the waiting chunk written so far
    std::string reason;
  };

  void release();
  int fail(int err, std::string msg);
  int readReg(uint64_t off, size_t len, uint64_t* v);
  int writeReg(uint64_t off, size_t len, uint64_t v);
  int writeState(uint32_t v);
  uint64_t readPending();
  int readDataOffset(uint64_t* v);
  uint64_t readDataSize();
  int writeDataSize(uint64_t v);
  int readCopiedPfns(uint64_t* v);
  int noteTrappedWrite(uint64_t off, uint64_t len);
  int consume(uint64_t off, uint64_t size);
  bool storePages(uint64_t off, const uint8_t* src, uint64_t len);
  int parseChunk(const uint8_t* p, uint64_t size, uint64_t chunk);
  int stage();
  uint64_t fillChunk(uint8_t* out, uint64_t cap);
  uint64_t estimate() const;
  bool stuckActive() const { return fault_ == Fault::kStuck && save_.k >= faultArg_; }
  bool wedged_ = false;
  bool strictTrapped_ = false;  // `wedged` fault fired: state writes, staging and reset fail EIO
  uint64_t slotOffset(uint64_t k) const;
  uint64_t trappedBytes(uint64_t lo, uint64_t hi) const;
  template <typename F> void forEachTrapped(uint64_t lo, uint64_t hi, F fn) const;
  void setDirty(uint64_t page);
  void logDma(uint64_t page);  // caller holds logMu_
  void startSave();
  // v2 (v2.cc). The data fd is a real pipe: the user holds one end, the vendor the other, fed or drained by the
  // shared vendor I/O thread (emu::io), and synchronously at state changes and PRECOPY_INFO.
  struct V2Session {
    int vfd = -1;         // vendor end (save: write end; resume: read end)
    bool save = false, eof = false, firstPassDone = false;
    uint32_t gen = 0;
    uint64_t off = 0, len = 0;      // produced bytes in data_[off, len) not yet in the pipe (save) / unparsed (resume)
    uint64_t produced = 0;          // save: stream bytes produced; resume: stream bytes parsed
    uint64_t initialEnd = 0;        // save: stream offset where the initial bytes end (once the first pass is done)
    uint64_t fills = 0;
  };
  int v2Arc(uint32_t cur, uint32_t next, int* fdOut);
  int v2Open(bool save);          // returns the user's fd
  void v2Close();
  void v2Fill();                  // caller holds mu_
  void v2Drain();                 // caller holds mu_
  void v2ParseAvailable();
  void v2Poison(const std::string& why);
  void v2Mirror();
  uint64_t v2Unread() const;

  const uint32_t id_;
  const Config cfg_;
  uint64_t pages_ = 0, dataAreaSize_ = 0, regionSize_ = 0, hdrEnd_ = 0;
  uint64_t chunk_ = 0;  // largest chunk staged: maxChunk, or the data area if that is smaller
  std::vector<Area> areas_;
  int stateFd_ = -1, dataFd_ = -1;
  uint8_t* state_ = nullptr;  // stateSize bytes
  uint8_t* data_ = nullptr;   // the device's own mapping of the data area

  std::mutex mu_;  // serialises every vendor-side access, staging, and the workload
  uint32_t reg_ = 0;  // raw device_state
  std::vector<uint64_t> dirty_;  // state pages dirty since the last send (allocated by the first save session)
  uint64_t dirtyCount_ = 0;
  // The DMA log belongs to the IOMMU side (type1 container), not to the vendor: its own lock, so a container query
  // never waits for a slow vendor access holding mu_. Lock order: mu_, then logMu_.
  std::mutex logMu_;
  std::vector<uint64_t> guestLog_;  // guest pages DMA-written (draft: always logged; linux-5.8: while logging_); allocated by the first logged write
  bool logging_ = false;
  uint8_t config_[256] = {};
  Fault fault_ = Fault::kNone;
  uint64_t faultArg_ = 0;
  std::string lastError_;
  SaveSession save_;
  ResumeSession res_;
  uint64_t startPfn_ = 0, pageSize_ = 0, totalPfns_ = 0, bitmapOff_ = 0;
  bool bitmapPending_ = false;
  uint64_t chunksStaged_ = 0, chunksConsumed_ = 0, pagesSent_ = 0, pagesLoaded_ = 0, workloadWrites_ = 0,
           dmaWrites_ = 0;
  std::atomic<bool> dead_{false};
  bool inPool_ = false;
  // Workload state (touched only under mu_ by the pool's tick).
  bool wlRunning_ = false;
  std::chrono::steady_clock::time_point wlLast_{};
  uint64_t wlRng_ = 0;
  double owedState_ = 0, owedDma_ = 0;
  uint32_t v2state_ = 2;  // enum vfio_device_mig_state (kV2)
  uint32_t v2gen_ = 0;
  V2Session v2_;
  std::vector<Range> dmaRanges_;  // v2 DMA logging ranges (under logMu_)
};

// The shared vendor I/O thread (one per process, started by the first v2 session): epoll over every v2 data pipe.
namespace io {
void watch(int fd, uint32_t id, uint32_t gen, bool out);  // one-shot: re-armed by each call
void unwatch(int fd);
}  // namespace io

// The shared workload pool: a few threads step every device with a workload (no thread per device).
namespace workload {
void add(Device* d);
void remove(Device* d);  // returns once no pool thread is stepping d
unsigned threads();      // pool threads started so far
}  // namespace workload

// Emulated guest RAM: one per process, like a VM's memory that all its devices DMA into. Created by the first DMA
// write and grown to the largest guestPages that wrote; pages are allocated when first written.
namespace guest {
// Holds guest RAM mapped (shared lock) and at least `pages` pages long while it lives. Throws vm::NativeError.
class Access {
 public:
  explicit Access(uint64_t pages);
  ~Access();
  Access(const Access&) = delete;
  Access& operator=(const Access&) = delete;
  void write8(uint64_t page, uint64_t v);  // 8 bytes at the page start; page < pages
};
uint64_t mappedBytes();  // current guest RAM size (0 until the first DMA write)
}  // namespace guest

// Process-global registry (ids from 1). All functions throw vm::NativeError(ENOENT) for an unknown id.
uint32_t create(const Config& cfg);
void destroy(uint32_t id);
std::shared_ptr<Device> get(uint32_t id);

}  // namespace emu
