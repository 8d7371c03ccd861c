// N-API bindings only: argument validation, conversion, and JS errors ({code, errno, message}). The contract is
// src/addon/native.ts. Native code never touches memory outside the region, the device, or the JS buffers.
#include <napi.h>

#include <cerrno>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "common/vfio_v2.h"
#include "datafd/datafd.h"
#include "emu/device.h"
#include "net/tcp.h"
#include "region/region.h"
#include "vfio/vfio.h"
#include "vfio/v2.h"

namespace vfu { void exportBindings(Napi::Env env, Napi::Object exports); }  // vfio-user/bindings.cc

namespace {

using vm::ArgError;
using vm::fmt;
using vm::NativeError;
using ull = unsigned long long;

constexpr double kMaxSafe = 9007199254740991.0;  // 2^53 - 1

std::string errName(int e) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (const char* n = strerrorname_np(e)) return n;
#endif
  switch (e) {  // older C libraries: the codes this addon produces
#define E(x) case x: return #x;
    E(EINVAL) E(EIO) E(ENOENT) E(EBADF) E(ENODEV) E(ENOMEM) E(EPERM) E(EACCES) E(EBUSY) E(ENOTTY) E(ENOTSUP)
    E(E2BIG) E(EAGAIN) E(EFAULT) E(ENXIO) E(EEXIST) E(ENOSPC) E(EPIPE) E(ENOSYS)
#undef E
    default: return "E" + std::to_string(e);
  }
}

// "regRead(h=1,off=16,width=8)": the operation and its arguments, for error messages.
std::string describe(const char* name, const Napi::CallbackInfo& info, std::initializer_list<const char*> args) {
  std::string s = std::string(name) + "(";
  size_t i = 0;
  for (const char* a : args) {
    if (i) s += ",";
    s += a;
    s += "=";
    Napi::Value v = info[i++];
    if (v.IsNumber()) {
      double d = v.As<Napi::Number>().DoubleValue();
      s += (std::floor(d) == d && std::fabs(d) <= kMaxSafe) ? std::to_string(static_cast<long long>(d)) : fmt("%g", d);
    } else if (v.IsBigInt()) {
      bool lossless;
      s += fmt("0x%llx", static_cast<ull>(v.As<Napi::BigInt>().Uint64Value(&lossless)));
    } else if (v.IsString()) {
      s += "'" + v.As<Napi::String>().Utf8Value() + "'";
    } else if (v.IsTypedArray()) {
      s += fmt("<%zu bytes>", v.As<Napi::TypedArray>().ByteLength());
    } else if (v.IsArray()) {
      s += fmt("[%u]", v.As<Napi::Array>().Length());
    } else if (v.IsUndefined()) {
      s += "undefined";
    } else {
      s += v.IsObject() ? "{..}" : "?";
    }
  }
  return s + ")";
}

[[noreturn]] void throwJs(Napi::Env env, const std::string& op, const std::string& code, int err, const std::string& detail) {
  Napi::Error e = Napi::Error::New(env, op + ": " + code + (detail.empty() ? "" : ": " + detail));
  e.Set("code", Napi::String::New(env, code));
  if (err) e.Set("errno", Napi::Number::New(env, err));
  throw e;
}

// Runs a binding body; native exceptions become JS errors naming the operation.
template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, const char* name, std::initializer_list<const char*> args, F body) {
  try {
    return body();
  } catch (const ArgError& e) {
    throwJs(info.Env(), describe(name, info, args), "ERR_ARG", 0, e.what());
  } catch (const NativeError& e) {
    throwJs(info.Env(), describe(name, info, args), errName(e.err), e.err, e.what());
  } catch (const std::bad_alloc&) {
    throwJs(info.Env(), describe(name, info, args), "ENOMEM", ENOMEM, "out of memory");
  } catch (const std::system_error& e) {  // std::thread creation
    throwJs(info.Env(), describe(name, info, args), errName(e.code().value()), e.code().value(), e.what());
  }
}

// ---- argument helpers ----------------------------------------------------------------------------------------
double number(const Napi::Value& v, const char* name) {
  if (!v.IsNumber()) throw ArgError(fmt("'%s' must be a number", name));
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) throw ArgError(fmt("'%s' must be finite", name));
  return d;
}

uint64_t integer(const Napi::Value& v, const char* name, double lo, double hi) {
  double d = number(v, name);
  if (std::floor(d) != d || d < lo || d > hi) throw ArgError(fmt("'%s' must be an integer in [%.0f, %.0f]", name, lo, hi));
  return static_cast<uint64_t>(d);
}
uint64_t u64(const Napi::Value& v, const char* name) { return integer(v, name, 0, kMaxSafe); }
uint32_t u32(const Napi::Value& v, const char* name) { return static_cast<uint32_t>(integer(v, name, 0, 4294967295.0)); }
int fdArg(const Napi::Value& v, const char* name) { return static_cast<int>(integer(v, name, 0, 2147483647.0)); }

struct Bytes {
  uint8_t* p;
  size_t n;
};
Bytes bytes(const Napi::Value& v, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw ArgError(fmt("'%s' must be a Uint8Array", name));
  auto a = v.As<Napi::Uint8Array>();
  return {a.Data(), a.ByteLength()};
}

Napi::Value field(const Napi::Object& o, const char* key) { return o.Get(key); }

std::shared_ptr<emu::Device> device(const Napi::CallbackInfo& info) { return emu::get(u32(info[0], "id")); }
std::shared_ptr<region::Region> regionArg(const Napi::Value& v) { return region::get(static_cast<int>(integer(v, "h", 0, 2147483647.0))); }

// [off, off+len) inside the region, [bufOff, bufOff+len) inside the buffer; both overflow-safe.
void checkRange(const region::Region& r, uint64_t off, uint64_t len, const Bytes& b, uint64_t bufOff) {
  if (!vm::fits(off, len, r.size()))
    throw ArgError(fmt("region range %llu+%llu exceeds the region size %llu", static_cast<ull>(off), static_cast<ull>(len), static_cast<ull>(r.size())));
  if (!vm::fits(bufOff, len, b.n))
    throw ArgError(fmt("buffer range %llu+%llu exceeds the buffer length %zu", static_cast<ull>(bufOff), static_cast<ull>(len), b.n));
}

Napi::Object deviceInfoObject(Napi::Env env, uint32_t flags, uint32_t regions, uint32_t irqs) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("flags", flags);
  o.Set("numRegions", regions);
  o.Set("numIrqs", irqs);
  return o;
}

Napi::Uint8Array toBytes(Napi::Env env, const std::vector<uint8_t>& v) {
  auto a = Napi::Uint8Array::New(env, v.size());
  if (!v.empty()) memcpy(a.Data(), v.data(), v.size());
  return a;
}

#define BIND(name, ...) Napi::Value name(const Napi::CallbackInfo& info) { return guarded(info, #name, {__VA_ARGS__}, [&]() -> Napi::Value
#define END_BIND ); }

// ---- emulated device ------------------------------------------------------------------------------------------
BIND(emuCreate, "cfg") {
  if (!info[0].IsObject()) throw ArgError("'cfg' must be an object");
  Napi::Object o = info[0].As<Napi::Object>();
  emu::Config c{};
  c.profile = static_cast<uint32_t>(integer(field(o, "profile"), "profile", 0, 2));
  c.stateSize = integer(field(o, "stateSize"), "stateSize", 8192, 68719476736.0);
  c.seed = u32(field(o, "seed"), "seed");
  Napi::Value zf = field(o, "zeroFill");
  if (!zf.IsBoolean()) throw ArgError("'zeroFill' must be a boolean");
  c.zeroFill = zf.As<Napi::Boolean>().Value();
  c.maxChunk = integer(field(o, "maxChunk"), "maxChunk", 8192, 67108864.0);
  c.dataMode = static_cast<uint32_t>(integer(field(o, "dataMode"), "dataMode", 0, 2));
  c.offsetPolicy = static_cast<uint32_t>(integer(field(o, "offsetPolicy"), "offsetPolicy", 0, 1));
  c.dirtyRate = number(field(o, "dirtyRate"), "dirtyRate");
  c.guestPages = integer(field(o, "guestPages"), "guestPages", 1, 16777216.0);
  c.dmaRate = number(field(o, "dmaRate"), "dmaRate");
  c.reservedBits = u32(field(o, "reservedBits"), "reservedBits");
  Napi::Value mf = field(o, "migFlags");
  c.migFlags = mf.IsUndefined() ? 7u : static_cast<uint32_t>(integer(mf, "migFlags", 0, 7));
  Napi::Value da = field(o, "dataArea");
  c.dataArea = da.IsUndefined() ? 0 : integer(da, "dataArea", 0, 1073741824.0);
  if (c.dataArea % 4096 || (c.dataArea && c.profile == emu::kV2)) throw ArgError("'dataArea' must be a multiple of 4096 (v1 profiles only)");
  if (c.profile == emu::kV2 && !(c.migFlags & v2uapi::kMigStopCopy)) throw ArgError("'migFlags' must include STOP_COPY (1)");
  if (c.stateSize % 4096 || c.maxChunk % 4096) throw ArgError("'stateSize' and 'maxChunk' must be multiples of 4096");
  if (c.dirtyRate < 0 || c.dirtyRate > 1e7 || c.dmaRate < 0 || c.dmaRate > 1e7)
    throw ArgError("'dirtyRate' and 'dmaRate' must be in [0, 1e7]");
  return Napi::Number::New(info.Env(), emu::create(c));
} END_BIND

BIND(emuDestroy, "id") {
  emu::destroy(u32(info[0], "id"));
  return info.Env().Undefined();
} END_BIND

BIND(emuInfo, "id") {
  emu::Info i = device(info)->info();
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  auto num = [&](const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
  num("id", i.id);
  num("profile", i.profile);
  num("stateSize", static_cast<double>(i.stateSize));
  num("maxChunk", static_cast<double>(i.maxChunk));
  num("dataAreaOffset", static_cast<double>(i.dataAreaOffset));
  num("dataAreaSize", static_cast<double>(i.dataAreaSize));
  num("regionSize", static_cast<double>(i.regionSize));
  num("deviceState", i.deviceState);
  num("chunksStaged", static_cast<double>(i.chunksStaged));
  num("chunksConsumed", static_cast<double>(i.chunksConsumed));
  num("pagesSent", static_cast<double>(i.pagesSent));
  num("pagesLoaded", static_cast<double>(i.pagesLoaded));
  num("workloadWrites", static_cast<double>(i.workloadWrites));
  num("dmaWrites", static_cast<double>(i.dmaWrites));
  o.Set("lastError", Napi::String::New(env, i.lastError));
  return o;
} END_BIND

// Process-wide emulation cost: threads of the shared workload pool and bytes of emulated guest RAM.
BIND(emuStats) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("workloadThreads", Napi::Number::New(info.Env(), emu::workload::threads()));
  o.Set("guestRamBytes", Napi::Number::New(info.Env(), static_cast<double>(emu::guest::mappedBytes())));
  return o;
} END_BIND

BIND(emuDeviceInfo, "id") {
  device(info);
  return deviceInfoObject(info.Env(), emu::kDeviceFlags, emu::kNumRegions, emu::kNumIrqs);
} END_BIND

BIND(emuRegionInfo, "id", "index") {
  auto d = device(info);
  return toBytes(info.Env(), d->regionInfo(u32(info[1], "index")));
} END_BIND

BIND(emuReset, "id") {
  device(info)->reset();
  return info.Env().Undefined();
} END_BIND

// Test entry point only (engine/test-hooks.ts): the vendor refuses trapped data accesses that are not naturally
// aligned 1/2/4/8-byte ones, as a driver only ever driven by QEMU's vfio_mig_rw may.
BIND(emuSetStrictTrapped, "id", "on") {
  if (!info[1].IsBoolean()) throw ArgError("'on' must be a boolean");
  device(info)->setStrictTrapped(info[1].As<Napi::Boolean>().Value());
  return info.Env().Undefined();
} END_BIND

BIND(emuSetFault, "id", "kind", "arg") {
  auto d = device(info);
  if (!info[1].IsString()) throw ArgError("'kind' must be a string");
  emu::Fault f;
  std::string kind = info[1].As<Napi::String>().Utf8Value();
  if (!emu::parseFault(kind, &f)) throw ArgError("unknown fault kind '" + kind + "'");
  if (d->config().profile == emu::kV2 && !emu::v2Implements(f))
    throw ArgError("fault kind '" + kind + "' is a v1 register/estimate fault: the v2 vendor does not implement it");
  d->setFault(f, info[2].IsUndefined() ? 0 : u64(info[2], "arg"));
  return info.Env().Undefined();
} END_BIND

BIND(emuReadState, "id", "off", "dst") {
  auto d = device(info);
  uint64_t off = u64(info[1], "off");
  Bytes b = bytes(info[2], "dst");
  if (!vm::fits(off, b.n, d->config().stateSize)) throw ArgError("range exceeds the device state");
  d->readState(off, b.p, b.n);
  return info.Env().Undefined();
} END_BIND

BIND(emuTouch, "id", "off", "value") {
  auto d = device(info);
  uint64_t off = u64(info[1], "off");
  if (off >= d->config().stateSize) throw ArgError("'off' exceeds the device state");
  d->touch(off, static_cast<uint8_t>(integer(info[2], "value", 0, 255)));
  return info.Env().Undefined();
} END_BIND

BIND(emuConfigRead, "id", "dst") {
  auto d = device(info);
  Bytes b = bytes(info[1], "dst");
  if (b.n != 256) throw ArgError("'dst' must be 256 bytes");
  d->configRead(b.p);
  return info.Env().Undefined();
} END_BIND

BIND(emuConfigWrite, "id", "src") {
  auto d = device(info);
  Bytes b = bytes(info[1], "src");
  if (b.n != 256) throw ArgError("'src' must be 256 bytes");
  d->configWrite(b.p);
  return info.Env().Undefined();
} END_BIND

BIND(emuDmaTouch, "id", "page") {
  auto d = device(info);
  uint64_t page = u64(info[1], "page");
  if (page >= d->config().guestPages) throw ArgError("'page' exceeds guest memory");
  d->dmaTouch(page);
  return info.Env().Undefined();
} END_BIND

BIND(emuDirtyPages, "id", "op", "iova", "size", "pgsize", "bitmap") {
  auto d = device(info);
  uint32_t op = u32(info[1], "op");
  uint64_t iova = u64(info[2], "iova"), size = u64(info[3], "size"), pgsize = u64(info[4], "pgsize");
  Bytes b{nullptr, 0};
  if (!info[5].IsUndefined() && !info[5].IsNull()) b = bytes(info[5], "bitmap");
  d->dirtyPages(op, iova, size, pgsize, b.p, b.n);
  return info.Env().Undefined();
} END_BIND

// ---- emulated v2 vendor (addon/src/emu/v2.cc): the kernel's VFIO_DEVICE_FEATURE semantics, op by op ---------------
BIND(emuV2MigrationFlags, "id") { return Napi::Number::New(info.Env(), static_cast<double>(device(info)->v2MigrationFlags())); } END_BIND
BIND(emuV2Probe, "id", "feature") { return Napi::Boolean::New(info.Env(), device(info)->v2Probe(u32(info[1], "feature"))); } END_BIND
BIND(emuV2GetState, "id") { return Napi::Number::New(info.Env(), device(info)->v2GetState()); } END_BIND
BIND(emuV2SetState, "id", "state") {
  return Napi::Number::New(info.Env(), device(info)->v2SetState(static_cast<uint32_t>(integer(info[1], "state", 0, 7))));
} END_BIND
BIND(emuV2PrecopyInfo, "id", "fd") {
  uint64_t initial = 0, dirty = 0;
  device(info)->v2PrecopyInfo(static_cast<int>(integer(info[1], "fd", -1, 2147483647.0)), &initial, &dirty);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("initialBytes", static_cast<double>(initial));
  o.Set("dirtyBytes", static_cast<double>(dirty));
  return o;
} END_BIND
BIND(emuV2DataSize, "id") { return Napi::Number::New(info.Env(), static_cast<double>(device(info)->v2DataSize())); } END_BIND
BIND(emuV2DmaStart, "id", "pageSize", "ranges") {
  if (!info[2].IsArray()) throw ArgError("'ranges' must be an array");
  auto a = info[2].As<Napi::Array>();
  if (a.Length() > 4096) throw ArgError("'ranges' has too many entries");
  std::vector<emu::Device::Range> rs;
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value v = a.Get(i);
    if (!v.IsObject()) throw ArgError("'ranges' entries must be {iova, length}");
    rs.push_back({u64(field(v.As<Napi::Object>(), "iova"), "iova"), u64(field(v.As<Napi::Object>(), "length"), "length")});
  }
  return Napi::Number::New(info.Env(), static_cast<double>(device(info)->v2DmaStart(u64(info[1], "pageSize"), rs)));
} END_BIND
BIND(emuV2DmaStop, "id") {
  device(info)->v2DmaStop();
  return info.Env().Undefined();
} END_BIND
BIND(emuV2DmaReport, "id", "iova", "length", "pageSize", "bitmap") {
  Bytes b = bytes(info[4], "bitmap");
  device(info)->v2DmaReport(u64(info[1], "iova"), u64(info[2], "length"), u64(info[3], "pageSize"), b.p, b.n);
  return info.Env().Undefined();
} END_BIND
BIND(v2NextState, "flags", "cur", "target") {
  return Napi::Number::New(info.Env(), v2uapi::nextState(u32(info[0], "flags"), u32(info[1], "cur"), u32(info[2], "target")));
} END_BIND

// ---- data fds (every reach with a real fd: kernel, emulated) ------------------------------------------------------
// (fd, buf, off, len, timeoutMs): the bounds-checked piece buf[off, off+len).
Bytes fdPiece(const Napi::CallbackInfo& info, int* timeoutMs) {
  Bytes b = bytes(info[1], "buf");
  uint64_t off = u64(info[2], "off"), len = u64(info[3], "len");
  if (!vm::fits(off, len, b.n)) throw ArgError(fmt("buffer range %llu+%llu exceeds the buffer length %zu", static_cast<ull>(off), static_cast<ull>(len), b.n));
  *timeoutMs = static_cast<int>(integer(info[4], "timeoutMs", 0, 60000));
  return {b.p + off, static_cast<size_t>(len)};
}
BIND(dataFdRead, "fd", "buf", "off", "len", "timeoutMs") {
  int t;
  Bytes p = fdPiece(info, &t);
  return Napi::Number::New(info.Env(), static_cast<double>(datafd::readSome(fdArg(info[0], "fd"), p.p, p.n, t)));
} END_BIND
BIND(dataFdWrite, "fd", "buf", "off", "len", "timeoutMs") {
  int t;
  Bytes p = fdPiece(info, &t);
  return Napi::Number::New(info.Env(), static_cast<double>(datafd::writeSome(fdArg(info[0], "fd"), p.p, p.n, t)));
} END_BIND
BIND(fdClose, "fd") {
  close(fdArg(info[0], "fd"));
  return info.Env().Undefined();
} END_BIND

// ---- TCP sockets of a live migration ---------------------------------------------------------------------------
// tcpKeepalive(fd, settings | null): set SO_KEEPALIVE and the TCP keepalive/user-timeout options (bounded as the
// kernel bounds them), then read them all back; null only reads.
BIND(tcpKeepalive, "fd", "settings") {
  int fd = fdArg(info[0], "fd");
  tcp::Keepalive set{};
  const tcp::Keepalive* want = nullptr;
  if (!info[1].IsNull() && !info[1].IsUndefined()) {
    if (!info[1].IsObject()) throw ArgError("'settings' must be an object or null");
    Napi::Object o = info[1].As<Napi::Object>();
    Napi::Value ka = field(o, "keepalive");
    if (!ka.IsBoolean()) throw ArgError("'keepalive' must be a boolean");
    set.keepalive = ka.As<Napi::Boolean>().Value() ? 1 : 0;
    set.idleS = static_cast<int>(integer(field(o, "idleS"), "idleS", 1, 32767));              // MAX_TCP_KEEPIDLE
    set.intervalS = static_cast<int>(integer(field(o, "intervalS"), "intervalS", 1, 32767));  // MAX_TCP_KEEPINTVL
    set.count = static_cast<int>(integer(field(o, "count"), "count", 1, 127));                // MAX_TCP_KEEPCNT
    set.userTimeoutMs = static_cast<unsigned>(integer(field(o, "userTimeoutMs"), "userTimeoutMs", 0, 2147483647.0));
    want = &set;
  }
  tcp::Keepalive r = tcp::keepalive(fd, want);
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("keepalive", Napi::Boolean::New(info.Env(), r.keepalive != 0));
  out.Set("idleS", r.idleS);
  out.Set("intervalS", r.intervalS);
  out.Set("count", r.count);
  out.Set("userTimeoutMs", Napi::Number::New(info.Env(), r.userTimeoutMs));
  return out;
} END_BIND

// ---- regions --------------------------------------------------------------------------------------------------
BIND(regionOpenEmu, "id") {
  return Napi::Number::New(info.Env(), region::add(std::make_shared<region::EmuRegion>(device(info))));
} END_BIND

BIND(regionOpenFd, "fd", "regionOffset", "regionSize", "areas", "mmap") {
  int fd = fdArg(info[0], "fd");
  uint64_t base = u64(info[1], "regionOffset"), size = u64(info[2], "regionSize");
  if (!info[3].IsArray()) throw ArgError("'areas' must be an array");
  if (!info[4].IsBoolean()) throw ArgError("'mmap' must be a boolean");
  Napi::Array arr = info[3].As<Napi::Array>();
  std::vector<region::AreaSpec> areas;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsObject()) throw ArgError("'areas' entries must be {offset, size}");
    Napi::Object a = v.As<Napi::Object>();
    region::AreaSpec s{u64(a.Get("offset"), "areas[].offset"), u64(a.Get("size"), "areas[].size")};
    if (!vm::fits(s.offset, s.size, size)) throw ArgError(fmt("area %u exceeds the region", i));
    areas.push_back(s);
  }
  std::sort(areas.begin(), areas.end(), [](const region::AreaSpec& x, const region::AreaSpec& y) { return x.offset < y.offset; });
  for (size_t i = 1; i < areas.size(); i++)
    if (areas[i].offset < areas[i - 1].offset + areas[i - 1].size) throw ArgError("areas overlap");
  bool map = info[4].As<Napi::Boolean>().Value();
  return Napi::Number::New(info.Env(), region::add(std::make_shared<region::FdRegion>(fd, base, size, std::move(areas), map)));
} END_BIND

// 0: bulk (one pread/pwrite per trapped piece), 1: aligned (QEMU's naturally aligned <= 8-byte accesses).
BIND(regionSetAccess, "h", "mode") {
  regionArg(info[0])->setAlignedAccess(integer(info[1], "mode", 0, 1) == 1);
  return info.Env().Undefined();
} END_BIND

BIND(regionClose, "h") {
  region::remove(static_cast<int>(integer(info[0], "h", 0, 2147483647.0)));
  return info.Env().Undefined();
} END_BIND

BIND(regionAreas, "h") {
  auto r = regionArg(info[0]);
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env, r->areas().size());
  uint32_t i = 0;
  for (const auto& a : r->areas()) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("offset", Napi::Number::New(env, static_cast<double>(a.offset)));
    o.Set("size", Napi::Number::New(env, static_cast<double>(a.size)));
    out.Set(i++, o);
  }
  return out;
} END_BIND

size_t widthArg(const Napi::CallbackInfo& info, const region::Region& r, uint64_t off) {
  uint64_t w = integer(info[2], "width", 0, 8);
  if (w != 4 && w != 8) throw ArgError("'width' must be 4 or 8");
  if (off % w) throw ArgError("'off' must be a multiple of 'width'");
  if (!vm::fits(off, w, r.size())) throw ArgError("register access beyond the region");
  return static_cast<size_t>(w);
}

BIND(regRead, "h", "off", "width") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), v = 0;
  size_t w = widthArg(info, *r, off);
  int rc = r->rw(false, off, &v, w);
  if (rc < 0) throw NativeError(-rc, r->errorText());
  return Napi::BigInt::New(info.Env(), w == 4 ? (v & 0xffffffffu) : v);
} END_BIND

BIND(regWrite, "h", "off", "width", "value") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off");
  size_t w = widthArg(info, *r, off);
  if (!info[3].IsBigInt()) throw ArgError("'value' must be a bigint");
  bool lossless = false;
  uint64_t v = info[3].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless || (w == 4 && v > 0xffffffffu)) throw ArgError(fmt("'value' does not fit %zu bytes", w));
  int rc = r->rw(true, off, &v, w);
  if (rc < 0) throw NativeError(-rc, r->errorText());
  return info.Env().Undefined();
} END_BIND

// One trapped access (a register, config space) on the libuv pool: for a region reached over a socket (vfio-user) the
// main thread must not wait for the round trip. The data is copied in (write) or out (read) on the main thread, so no
// JS memory is touched from the pool; the region stays alive through its shared_ptr even if closed meanwhile. The
// device's Atomics lock (held by the caller across the await) keeps workers off the region meanwhile.
class RegionRwWorker : public Napi::AsyncWorker {
 public:
  RegionRwWorker(Napi::Env env, std::shared_ptr<region::Region> r, uint64_t off, std::vector<uint8_t> data, bool write, std::string op)
      : Napi::AsyncWorker(env), r_(std::move(r)), off_(off), data_(std::move(data)), write_(write), op_(std::move(op)),
        d_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return d_.Promise(); }
  void Execute() override {
    int rc = r_->rw(write_, off_, data_.data(), data_.size());
    if (rc < 0) {
      err_ = -rc;
      text_ = r_->errorText();  // thread-local in some regions: read on this thread
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (!err_) {
      d_.Resolve(write_ ? toBytes(env, {}) : toBytes(env, data_));
      return;
    }
    std::string code = errName(err_);
    Napi::Error e = Napi::Error::New(env, op_ + ": " + code + (text_.empty() ? "" : ": " + text_));
    e.Set("code", Napi::String::New(env, code));
    e.Set("errno", Napi::Number::New(env, err_));
    d_.Reject(e.Value());
  }

 private:
  std::shared_ptr<region::Region> r_;
  uint64_t off_;
  std::vector<uint8_t> data_;
  bool write_;
  std::string op_;
  Napi::Promise::Deferred d_;
  int err_ = 0;
  std::string text_;
};

// Read `len` bytes (data undefined) or write `data` at region offset `off`, as one rw() of exactly that size.
BIND(regionRwAsync, "h", "off", "len", "data") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = integer(info[2], "len", 1, 1 << 20);
  if (!vm::fits(off, len, r->size())) throw ArgError(fmt("region range %llu+%llu exceeds the region size %llu", static_cast<ull>(off), static_cast<ull>(len), static_cast<ull>(r->size())));
  bool write = !info[3].IsUndefined();
  std::vector<uint8_t> data;
  if (write) {
    Bytes b = bytes(info[3], "data");
    if (b.n != len) throw ArgError(fmt("'data' holds %zu bytes, 'len' says %llu", b.n, static_cast<ull>(len)));
    data.assign(b.p, b.p + b.n);
  } else {
    data.assign(static_cast<size_t>(len), 0);
  }
  auto* w = new RegionRwWorker(info.Env(), std::move(r), off, std::move(data), write, describe("regionRwAsync", info, {"h", "off", "len"}));
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
} END_BIND

BIND(regionCopyOut, "h", "off", "len", "dst", "dstOff") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = u64(info[2], "len"), dstOff = u64(info[4], "dstOff");
  Bytes b = bytes(info[3], "dst");
  checkRange(*r, off, len, b, dstOff);
  if (len == 0) return Napi::Number::New(info.Env(), 0);
  return Napi::Number::New(info.Env(), static_cast<double>(region::copyOut(*r, off, len, b.p + dstOff)));
} END_BIND

// Zero-copy save of one record: see region::sendRecord. `buf` holds the record head at [0, 56) and the scratch for
// trapped pieces at [64, 64+len). -1 when the CPU lacks SSE4.2 (the caller then copies and writes itself).
BIND(regionSendRecord, "h", "off", "len", "buf", "fd", "pos", "trailer") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = u64(info[2], "len"), pos = u64(info[5], "pos");
  Bytes b = bytes(info[3], "buf");
  int fd = static_cast<int>(integer(info[4], "fd", 0, 1 << 30));
  if (!info[6].IsBoolean()) throw ArgError("'trailer' must be a boolean");
  checkRange(*r, off, len, b, 64);
  if (!crc32c::available()) return Napi::Number::New(info.Env(), -1);
  return Napi::Number::New(info.Env(), static_cast<double>(region::sendRecord(*r, off, len, b.p + 64, fd, pos, b.p, info[6].As<Napi::Boolean>().Value())));
} END_BIND

// Zero-copy load of one data packet: see region::recvData. scratch[0..len) receives the trapped pieces.
// -1 when the CPU lacks SSE4.2 (the caller then reads the record into memory itself).
BIND(regionRecvData, "h", "off", "len", "fd", "pos", "scratch", "crc") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = u64(info[2], "len"), pos = u64(info[4], "pos");
  int fd = static_cast<int>(integer(info[3], "fd", 0, 1 << 30));
  Bytes b = bytes(info[5], "scratch");
  uint32_t crc = u32(info[6], "crc");
  checkRange(*r, off, len, b, 0);
  if (!crc32c::available()) return Napi::Number::New(info.Env(), -1);
  return Napi::Number::New(info.Env(), region::recvData(*r, off, len, fd, pos, b.p, crc));
} END_BIND

// Lower the calling thread's CPU priority (nice += delta, Linux per-thread). Workers call it so that the main
// thread, which answers dirty-bitmap queries, wins the CPU when it wakes on a 2-core machine. Returns the new nice.
BIND(lowerThreadPriority, "delta") {
  int delta = static_cast<int>(integer(info[0], "delta", 0, 19));
  pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  errno = 0;
  int cur = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
  if (cur == -1 && errno != 0) throw vm::NativeError(errno, "getpriority");
  int next = std::min(19, cur + delta);
  if (setpriority(PRIO_PROCESS, static_cast<id_t>(tid), next) != 0) throw vm::NativeError(errno, "setpriority");
  return Napi::Number::New(info.Env(), next);
} END_BIND

// CRC32C of buf[0..len) continued from `crc` (tests compare it with the library); -1 without SSE4.2.
BIND(crc32cNative, "buf", "crc") {
  Bytes b = bytes(info[0], "buf");
  uint32_t crc = u32(info[1], "crc");
  if (!crc32c::available()) return Napi::Number::New(info.Env(), -1);
  return Napi::Number::New(info.Env(), crc32c::copyUpdate(crc, b.p, nullptr, b.n));
} END_BIND

BIND(regionCopyIn, "h", "off", "len", "src", "srcOff", "which") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = u64(info[2], "len"), srcOff = u64(info[4], "srcOff");
  Bytes b = bytes(info[3], "src");
  int which = static_cast<int>(integer(info[5], "which", 1, 3));
  checkRange(*r, off, len, b, srcOff);
  if (len == 0) return Napi::Number::New(info.Env(), 0);
  return Napi::Number::New(info.Env(), static_cast<double>(region::copyIn(*r, off, len, b.p + srcOff, which)));
} END_BIND

// ---- real VFIO ------------------------------------------------------------------------------------------------
BIND(vfioOpenDevice, "groupPath", "deviceName") {
  if (!info[0].IsString() || !info[1].IsString()) throw ArgError("'groupPath' and 'deviceName' must be strings");
  vfio::Handles h = vfio::openDevice(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::String>().Utf8Value());
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("container", h.container);
  o.Set("group", h.group);
  o.Set("device", h.device);
  return o;
} END_BIND

BIND(vfioDeviceInfo, "deviceFd") {
  vfio::DeviceInfo d = vfio::deviceInfo(fdArg(info[0], "deviceFd"));
  return deviceInfoObject(info.Env(), d.flags, d.numRegions, d.numIrqs);
} END_BIND

BIND(vfioRegionInfo, "deviceFd", "index") {
  return toBytes(info.Env(), vfio::regionInfo(fdArg(info[0], "deviceFd"), u32(info[1], "index")));
} END_BIND

// Type1 container dirty tracking for a real VFIO device (op 1 START, 2 STOP, 4 GET_BITMAP). The bitmap must hold
// one bit per pgsize page of [iova, iova+size), rounded up to 64-bit words; the kernel only sets bits.
BIND(vfioDirtyPages, "containerFd", "op", "iova", "size", "pgsize", "bitmap") {
  int fd = fdArg(info[0], "containerFd");
  uint32_t op = u32(info[1], "op");
  if (op != 1 && op != 2 && op != 4) throw ArgError("'op' must be 1 (START), 2 (STOP) or 4 (GET_BITMAP)");
  uint64_t iova = u64(info[2], "iova"), size = u64(info[3], "size"), pgsize = u64(info[4], "pgsize");
  uint8_t* p = nullptr;
  uint64_t bmBytes = 0;
  if (op == 4) {
    if (pgsize < 4096 || (pgsize & (pgsize - 1)) || size == 0 || iova % pgsize || size % pgsize)
      throw ArgError("GET_BITMAP needs a power-of-two pgsize >= 4096 and a pgsize-aligned, non-empty iova range");
    Bytes b = bytes(info[5], "bitmap");
    uint64_t need = (size / pgsize + 63) / 64 * 8;
    if (b.n < need) throw ArgError(fmt("bitmap of %zu bytes is smaller than the %llu the range needs", b.n, static_cast<ull>(need)));
    p = b.p;
    bmBytes = need;
  }
  vfio::dirtyPages(fd, op, iova, size, pgsize, p, bmBytes);
  return info.Env().Undefined();
} END_BIND

BIND(vfioReset, "deviceFd") {
  vfio::reset(fdArg(info[0], "deviceFd"));
  return info.Env().Undefined();
} END_BIND

BIND(vfioClose, "fd") {
  vfio::closeFd(fdArg(info[0], "fd"));
  return info.Env().Undefined();
} END_BIND

// ---- real VFIO: migration v2 and the cdev path ------------------------------------------------------------------
BIND(vfioOpenCdev, "cdevPath") {
  if (!info[0].IsString()) throw ArgError("'cdevPath' must be a string");
  vfio::CdevHandles h = vfio::openCdev(info[0].As<Napi::String>().Utf8Value());
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("device", h.device);
  o.Set("iommufd", h.iommufd);
  o.Set("devId", h.devId);
  o.Set("ioasId", h.ioasId);
  return o;
} END_BIND

// u64 from the kernel as a JS number; beyond 2^53 it would silently lose bits, so refuse.
Napi::Number safeU64(Napi::Env env, uint64_t v, const char* what) {
  if (static_cast<double>(v) > kMaxSafe) throw NativeError(ERANGE, fmt("%s %llu exceeds 2^53", what, static_cast<ull>(v)));
  return Napi::Number::New(env, static_cast<double>(v));
}

BIND(vfioMigrationFlags, "deviceFd") {
  return safeU64(info.Env(), vfio::migrationFlags(fdArg(info[0], "deviceFd")), "migration flags");
} END_BIND

BIND(vfioFeatureProbe, "deviceFd", "feature", "getSet") {
  return Napi::Boolean::New(info.Env(), vfio::featureProbe(fdArg(info[0], "deviceFd"), u32(info[1], "feature"), u32(info[2], "getSet")));
} END_BIND

BIND(vfioMigState, "deviceFd") {
  return Napi::Number::New(info.Env(), vfio::migStateGet(fdArg(info[0], "deviceFd")));
} END_BIND

BIND(vfioSetMigState, "deviceFd", "state") {
  return Napi::Number::New(info.Env(), vfio::migStateSet(fdArg(info[0], "deviceFd"), u32(info[1], "state")));
} END_BIND

BIND(vfioPrecopyInfo, "dataFd") {
  vfio::PrecopyInfo p = vfio::precopyInfo(fdArg(info[0], "dataFd"));
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("initialBytes", safeU64(info.Env(), p.initialBytes, "initial_bytes"));
  o.Set("dirtyBytes", safeU64(info.Env(), p.dirtyBytes, "dirty_bytes"));
  return o;
} END_BIND

BIND(vfioMigDataSize, "deviceFd") {
  return safeU64(info.Env(), vfio::migDataSize(fdArg(info[0], "deviceFd")), "stop_copy_length");
} END_BIND

// ranges: [{iova, length}], 1..256 of them (the kernel's PAGE_SIZE/16 limit), page-aligned; returns the page size chosen.
BIND(vfioDmaLogStart, "deviceFd", "pageSize", "ranges") {
  int fd = fdArg(info[0], "deviceFd");
  uint64_t pg = u64(info[1], "pageSize");
  if (pg < 4096 || (pg & (pg - 1))) throw ArgError("'pageSize' must be a power of two >= 4096");
  if (!info[2].IsArray()) throw ArgError("'ranges' must be an array");
  Napi::Array arr = info[2].As<Napi::Array>();
  if (arr.Length() == 0 || arr.Length() > 256) throw ArgError("'ranges' must hold 1..256 ranges");
  std::vector<vfio::IovaRange> r;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsObject()) throw ArgError("each range must be {iova, length}");
    Napi::Object o = v.As<Napi::Object>();
    uint64_t iova = u64(o.Get("iova"), "iova"), len = u64(o.Get("length"), "length");
    if (len == 0 || iova % pg || len % pg || !vm::fits(iova, len, ~0ULL)) throw ArgError(fmt("range %u is empty or not page aligned", i));
    r.push_back({iova, len});
  }
  return safeU64(info.Env(), vfio::dmaLoggingStart(fd, pg, r), "page_size");
} END_BIND

BIND(vfioDmaLogStop, "deviceFd") {
  vfio::dmaLoggingStop(fdArg(info[0], "deviceFd"));
  return info.Env().Undefined();
} END_BIND

// The bitmap needs one bit per page of [iova, iova+length), rounded up to 64-bit words; the kernel only sets bits.
BIND(vfioDmaLogReport, "deviceFd", "iova", "length", "pageSize", "bitmap") {
  int fd = fdArg(info[0], "deviceFd");
  uint64_t iova = u64(info[1], "iova"), len = u64(info[2], "length"), pg = u64(info[3], "pageSize");
  if (pg < 4096 || (pg & (pg - 1)) || len == 0 || iova % pg || len % pg)
    throw ArgError("REPORT needs a power-of-two pageSize >= 4096 and a page-aligned, non-empty range");
  Bytes b = bytes(info[4], "bitmap");
  uint64_t need = (len / pg + 63) / 64 * 8;
  if (b.n < need) throw ArgError(fmt("bitmap of %zu bytes is smaller than the %llu the range needs", b.n, static_cast<ull>(need)));
  vfio::dmaLoggingReport(fd, iova, len, pg, b.p);
  return info.Env().Undefined();
} END_BIND

BIND(uapiLayout) {
  Napi::Object o = Napi::Object::New(info.Env());
  for (const auto& kv : vfio::layout()) o.Set(kv.first, Napi::Number::New(info.Env(), kv.second));
  for (const auto& kv : vfio::layoutV2()) o.Set(kv.first, Napi::Number::New(info.Env(), kv.second));
  return o;
} END_BIND

// ---- bench ----------------------------------------------------------------------------------------------------
BIND(benchCopyLimit, "h", "off", "len", "chunk", "total", "threads", "dst") {
  auto r = regionArg(info[0]);
  uint64_t off = u64(info[1], "off"), len = u64(info[2], "len"), chunk = u64(info[3], "chunk"), total = u64(info[4], "total");
  unsigned threads = static_cast<unsigned>(integer(info[5], "threads", 1, 2));
  Bytes b = bytes(info[6], "dst");
  if (len == 0 || !vm::fits(off, len, r->size())) throw ArgError("[off, off+len) must be a non-empty range of the region");
  if (chunk == 0 || chunk > len || chunk > b.n / threads) throw ArgError("'chunk' must be in [1, min(len, dst.length/threads)]");
  return Napi::Number::New(info.Env(), bench::copyLimit(*r, off, len, chunk, total, threads, b.p, b.n));
} END_BIND

BIND(baselineSequentialSave, "handles", "profile", "buf", "outFd") {
  if (!info[0].IsArray()) throw ArgError("'handles' must be an array");
  Napi::Array arr = info[0].As<Napi::Array>();
  std::vector<std::shared_ptr<region::Region>> regions;
  for (uint32_t i = 0; i < arr.Length(); i++) regions.push_back(regionArg(arr.Get(i)));
  uint32_t profile = static_cast<uint32_t>(integer(info[1], "profile", 0, 1));
  Bytes b = bytes(info[2], "buf");
  int fd = fdArg(info[3], "outFd");
  return Napi::Number::New(info.Env(), static_cast<double>(bench::sequentialSave(regions, profile, b.p, b.n, fd)));
} END_BIND

Napi::Object Init(Napi::Env env, Napi::Object exports) {
#define EXPORT(f) exports.Set(#f, Napi::Function::New(env, f, #f))
  EXPORT(emuCreate); EXPORT(emuDestroy); EXPORT(emuStats); EXPORT(emuInfo); EXPORT(emuDeviceInfo); EXPORT(emuRegionInfo);
  EXPORT(emuReset); EXPORT(emuSetFault); EXPORT(emuSetStrictTrapped); EXPORT(emuReadState); EXPORT(emuTouch); EXPORT(emuConfigRead);
  EXPORT(emuConfigWrite); EXPORT(emuDmaTouch); EXPORT(emuDirtyPages);
  EXPORT(emuV2MigrationFlags); EXPORT(emuV2Probe); EXPORT(emuV2GetState); EXPORT(emuV2SetState); EXPORT(emuV2PrecopyInfo);
  EXPORT(emuV2DataSize); EXPORT(emuV2DmaStart); EXPORT(emuV2DmaStop); EXPORT(emuV2DmaReport); EXPORT(v2NextState);
  EXPORT(dataFdRead); EXPORT(dataFdWrite); EXPORT(fdClose); EXPORT(tcpKeepalive);
  EXPORT(regionOpenEmu); EXPORT(regionOpenFd); EXPORT(regionClose); EXPORT(regionSetAccess); EXPORT(regionAreas); EXPORT(regRead);
  EXPORT(regWrite); EXPORT(regionRwAsync); EXPORT(regionCopyOut); EXPORT(crc32cNative); EXPORT(lowerThreadPriority); EXPORT(regionSendRecord); EXPORT(regionRecvData); EXPORT(regionCopyIn);
  EXPORT(vfioOpenDevice); EXPORT(vfioDeviceInfo); EXPORT(vfioRegionInfo); EXPORT(vfioReset); EXPORT(vfioDirtyPages); EXPORT(vfioClose);
  EXPORT(vfioOpenCdev); EXPORT(vfioMigrationFlags); EXPORT(vfioFeatureProbe); EXPORT(vfioMigState); EXPORT(vfioSetMigState);
  EXPORT(vfioPrecopyInfo); EXPORT(vfioMigDataSize); EXPORT(vfioDmaLogStart); EXPORT(vfioDmaLogStop); EXPORT(vfioDmaLogReport);
  EXPORT(uapiLayout); EXPORT(benchCopyLimit); EXPORT(baselineSequentialSave);
#undef EXPORT
  vfu::exportBindings(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(vfio_mig, Init)
