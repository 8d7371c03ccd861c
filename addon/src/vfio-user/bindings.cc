// N-API bindings of the vfio-user client connection, its regions and the device server (contract:
// src/addon/native.ts). Kept apart from addon.cc; the same error shape ({code, errno, message}).
#include <napi.h>

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "emu/device.h"
#include "region/region.h"
#include "vfio-user/conn.h"
#include "vfio-user/server.h"

namespace vfu {
namespace {

using vm::ArgError;
using vm::fmt;
using vm::NativeError;

[[noreturn]] void throwJs(Napi::Env env, const char* op, int err, const std::string& detail) {
  std::string code = err ? (strerrorname_np(err) ? strerrorname_np(err) : "E" + std::to_string(err)) : "ERR_ARG";
  Napi::Error e = Napi::Error::New(env, std::string(op) + ": " + code + ": " + detail);
  e.Set("code", Napi::String::New(env, code));
  if (err) e.Set("errno", Napi::Number::New(env, err));
  throw e;
}

template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, const char* op, F body) {
  try {
    return body();
  } catch (const ArgError& e) {
    throwJs(info.Env(), op, 0, e.what());
  } catch (const NativeError& e) {
    throwJs(info.Env(), op, e.err, e.what());
  } catch (const std::bad_alloc&) {
    throwJs(info.Env(), op, ENOMEM, "out of memory");
  } catch (const std::system_error& e) {
    throwJs(info.Env(), op, e.code().value(), e.what());
  }
}

uint64_t intArg(const Napi::Value& v, const char* name, double lo, double hi) {
  if (!v.IsNumber()) throw ArgError(fmt("'%s' must be a number", name));
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || d < lo || d > hi) throw ArgError(fmt("'%s' must be an integer in [%.0f, %.0f]", name, lo, hi));
  return static_cast<uint64_t>(d);
}
uint32_t u32(const Napi::Value& v, const char* name) { return static_cast<uint32_t>(intArg(v, name, 0, 4294967295.0)); }

Napi::Value result(Napi::Env env, const std::vector<uint8_t>& reply, const std::vector<int>& fds) {
  Napi::Object o = Napi::Object::New(env);
  Napi::Uint8Array b = Napi::Uint8Array::New(env, reply.size());
  if (!reply.empty()) memcpy(b.Data(), reply.data(), reply.size());
  o.Set("reply", b);
  Napi::Array f = Napi::Array::New(env, fds.size());
  for (uint32_t i = 0; i < fds.size(); i++) f.Set(i, fds[i]);
  o.Set("fds", f);
  return o;
}

struct Req {
  std::shared_ptr<Conn> conn;
  uint16_t cmd;
  std::vector<uint8_t> body;
  size_t minReply, maxReply, maxFds;
};

Req reqArgs(const Napi::CallbackInfo& info) {
  Req r;
  r.conn = getConn(u32(info[0], "conn"));
  r.cmd = static_cast<uint16_t>(intArg(info[1], "cmd", 1, 65535));
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) throw ArgError("'body' must be a Uint8Array");
  auto b = info[2].As<Napi::Uint8Array>();
  r.body.assign(b.Data(), b.Data() + b.ByteLength());
  r.minReply = intArg(info[3], "minReply", 0, 1 << 24);
  r.maxReply = intArg(info[4], "maxReply", 0, 1 << 24);
  r.maxFds = intArg(info[5], "maxFds", 0, 16);
  return r;
}

// A job on the libuv pool that settles a Promise: run() there (a NativeError becomes the rejection, the same shape as
// a synchronous call's error: {code, errno, message}), value() back on the main thread.
class PoolJob : public Napi::AsyncWorker {
 public:
  PoolJob(Napi::Env env, const char* op) : Napi::AsyncWorker(env), op_(op), d_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return d_.Promise(); }
  void Execute() final {
    try {
      run();
    } catch (const NativeError& e) {
      err_ = e.err;
      text_ = e.what();
    } catch (const std::exception& e) {
      err_ = EIO;
      text_ = e.what();
    }
  }
  void OnOK() final {
    Napi::Env env = Env();
    if (!err_) {
      d_.Resolve(value(env));
      return;
    }
    const char* n = strerrorname_np(err_);
    Napi::Error e = Napi::Error::New(env, std::string(op_) + ": " + (n ? n : "EIO") + ": " + text_);
    e.Set("code", Napi::String::New(env, n ? n : "EIO"));
    e.Set("errno", Napi::Number::New(env, err_));
    d_.Reject(e.Value());
  }

 protected:
  virtual void run() = 0;
  virtual Napi::Value value(Napi::Env env) = 0;

 private:
  const char* op_;
  Napi::Promise::Deferred d_;
  int err_ = 0;
  std::string text_;
};

// The same request on the libuv pool: the main thread never waits on the socket.
class RequestWorker : public PoolJob {
 public:
  // The interrupt count is taken now: a vfuInterrupt() after this call cancels the request even before it runs.
  RequestWorker(Napi::Env env, Req r) : PoolJob(env, "vfuRequestAsync"), r_(std::move(r)), gen_(r_.conn->interrupts()) {}

 protected:
  void run() override {
    r_.conn->request(r_.cmd, r_.body.data(), r_.body.size(), &reply_, r_.minReply, r_.maxReply, &fds_, r_.maxFds, gen_);
  }
  Napi::Value value(Napi::Env env) override { return result(env, reply_, fds_); }

 private:
  Req r_;
  uint64_t gen_;
  std::vector<uint8_t> reply_;
  std::vector<int> fds_;
};

// connect(2) on the libuv pool: a listener that does not accept (its backlog full: a stopped server) is waited for
// there, bounded by the timeout, never on the main thread.
class ConnectWorker : public PoolJob {
 public:
  ConnectWorker(Napi::Env env, std::string path, uint32_t timeoutMs) : PoolJob(env, "vfuConnect"), path_(std::move(path)), timeoutMs_(timeoutMs) {}

 protected:
  void run() override {
    conn_ = Conn::open(path_, timeoutMs_);
    Limits l;
    l.timeoutMs = timeoutMs_;
    conn_->setLimits(l);
  }
  Napi::Value value(Napi::Env env) override { return Napi::Number::New(env, addConn(std::move(conn_))); }

 private:
  std::string path_;
  uint32_t timeoutMs_;
  std::shared_ptr<Conn> conn_;
};

Napi::Value vfuConnect(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuConnect", [&] {
    if (!info[0].IsString()) throw ArgError("'path' must be a string");
    uint32_t t = static_cast<uint32_t>(intArg(info[1], "timeoutMs", 1, 3600000));
    auto* w = new ConnectWorker(info.Env(), info[0].As<Napi::String>().Utf8Value(), t);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

Napi::Value vfuSetLimits(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuSetLimits", [&] {
    Limits l;
    l.maxXfer = static_cast<uint32_t>(intArg(info[1], "maxXfer", 1, 1 << 30));
    l.writeBound = static_cast<uint32_t>(intArg(info[2], "writeBound", 1, 1 << 30));
    l.timeoutMs = static_cast<uint32_t>(intArg(info[3], "timeoutMs", 1, 3600000));
    getConn(u32(info[0], "conn"))->setLimits(l);
    return info.Env().Undefined();
  });
}

Napi::Value vfuRequest(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuRequest", [&] {
    Req r = reqArgs(info);
    std::vector<uint8_t> reply;
    std::vector<int> fds;
    r.conn->request(r.cmd, r.body.data(), r.body.size(), &reply, r.minReply, r.maxReply, &fds, r.maxFds);
    return result(info.Env(), reply, fds);
  });
}

Napi::Value vfuRequestAsync(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuRequestAsync", [&] {
    auto* w = new RequestWorker(info.Env(), reqArgs(info));
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

Napi::Value vfuClose(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuClose", [&] {
    auto c = takeConn(u32(info[0], "conn"));
    c->closeNow();  // a request in flight fails at once; regions still holding it fail fast from now on
    return info.Env().Undefined();
  });
}

// Release the request in flight on this connection (and ones already asked for) with ECANCELED; the connection
// stays usable when the request had been sent and its reply had not begun (see Conn::interrupt).
Napi::Value vfuInterrupt(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuInterrupt", [&] {
    getConn(u32(info[0], "conn"))->interrupt();
    return info.Env().Undefined();
  });
}

Napi::Value vfuRequests(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuRequests", [&] {
    return Napi::Number::New(info.Env(), static_cast<double>(getConn(u32(info[0], "conn"))->requests()));
  });
}

Napi::Value regionOpenUser(const Napi::CallbackInfo& info) {
  return guarded(info, "regionOpenUser", [&] {
    auto c = getConn(u32(info[0], "conn"));
    uint32_t index = u32(info[1], "index");
    uint64_t size = intArg(info[2], "size", 1, 9007199254740991.0);
    int fd = static_cast<int>(intArg(info[3], "fd", -1, 2147483647.0));
    uint64_t fdOffset = intArg(info[4], "fdOffset", 0, 9007199254740991.0);
    if (!info[5].IsArray()) throw ArgError("'areas' must be an array");
    Napi::Array arr = info[5].As<Napi::Array>();
    std::vector<region::AreaSpec> areas;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Object a = arr.Get(i).As<Napi::Object>();
      uint64_t off = intArg(a.Get("offset"), "offset", 0, 9007199254740991.0), sz = intArg(a.Get("size"), "size", 0, 9007199254740991.0);
      if (!vm::fits(off, sz, size)) throw ArgError("a sparse area lies outside the region");
      areas.push_back({off, sz});
    }
    return Napi::Number::New(info.Env(), region::add(std::make_shared<UserRegion>(c, index, size, fd, fdOffset, areas)));
  });
}

Napi::Value vfuServerStart(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuServerStart", [&] {
    auto dev = emu::get(u32(info[0], "id"));
    if (!info[1].IsString()) throw ArgError("'path' must be a string");
    ServerOptions o;
    o.maxXfer = static_cast<uint32_t>(intArg(info[2], "maxXfer", 4096, 1 << 20));
    o.msgTimeoutMs = static_cast<uint32_t>(intArg(info[3], "msgTimeoutMs", 1, 3600000));
    return Napi::Number::New(info.Env(), addServer(std::make_shared<Server>(dev, info[1].As<Napi::String>().Utf8Value(), o)));
  });
}

Napi::Value vfuServerStop(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuServerStop", [&] {
    takeServer(u32(info[0], "server"))->stop();
    return info.Env().Undefined();
  });
}

Napi::Value vfuServerStats(const Napi::CallbackInfo& info) {
  return guarded(info, "vfuServerStats", [&] {
    ServerStats s = getServer(u32(info[0], "server"))->stats();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("clients", static_cast<double>(s.clients));
    o.Set("refused", static_cast<double>(s.refused));
    o.Set("requests", static_cast<double>(s.requests));
    o.Set("errorReplies", static_cast<double>(s.errorReplies));
    o.Set("dropped", static_cast<double>(s.dropped));
    o.Set("connected", s.connected);
    o.Set("largestWrite", s.largestWrite);
    o.Set("lastError", s.lastError);
    return o;
  });
}

Napi::Value closeFd(const Napi::CallbackInfo& info) {
  return guarded(info, "closeFd", [&] {
    close(static_cast<int>(intArg(info[0], "fd", 0, 2147483647.0)));
    return info.Env().Undefined();
  });
}

}  // namespace

void exportBindings(Napi::Env env, Napi::Object exports) {
#define EXPORT(f) exports.Set(#f, Napi::Function::New(env, f, #f))
  EXPORT(vfuConnect); EXPORT(vfuSetLimits); EXPORT(vfuRequest); EXPORT(vfuRequestAsync); EXPORT(vfuClose); EXPORT(vfuInterrupt);
  EXPORT(vfuRequests); EXPORT(regionOpenUser); EXPORT(vfuServerStart); EXPORT(vfuServerStop); EXPORT(vfuServerStats);
  EXPORT(closeFd);
#undef EXPORT
}

}  // namespace vfu
