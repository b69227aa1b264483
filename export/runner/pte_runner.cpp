// pte_runner: greedy generation from token ids with a dijiang-export .pte, in C++.
//
// The binary a phone or a robot computer runs (ARM64 Linux), and the one the ARM64
// tier of runtime_tests runs under qemu. It links the ExecuTorch runtime shipped in
// the executorch wheel (libexecutorch.so: Program, Module, data loaders; the XNNPACK
// backend and the CPU kernels register themselves when their libraries load).
//
//   pte_runner MODEL.pte --prompt 1,2,3 --new-tokens 8 [--logits-steps 0,3]
//              [--prefill-logits] [--logits-out FILE] [--threads N] [--json] [--verbose]
//
// The .pte contract (DESIGN.md section 3): forward(tokens int64 [1, T], start_pos int64
// [1]) -> logits float32 [1, 1, V] (the last position's; files from before that
// return [1, T, V], also read), T <= get_max_seq_len; start_pos 0 clears the
// recurrent state inside the graph. Prompts longer than get_max_seq_len go in
// several calls. Step 0 is the prefill (logits of the last prompt position, or of
// every position with --prefill-logits, the prompt then fed one token per call);
// step i >= 1 is the i-th single-token decode call.
// New tokens: argmax of step 0, then of each decode step (new_tokens - 1 decode calls).
//
// Errors: one line "pte_runner: error: ..." on stderr, exit 2 (bad input) or 3
// (the file needs something this runtime lacks, e.g. a .pte for another target).

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace executorch::extension::threadpool {
class ThreadPool {  // declared here: the wheel ships the library, not this header
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::Module;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

constexpr const char* kMarker = "dijiang_recurrent_state";
bool g_verbose = false;

[[noreturn]] void fail(int code, const std::string& msg) {
  std::fprintf(stderr, "pte_runner: error: %s\n", msg.c_str());
  std::exit(code);
}

std::string error_name(Error e) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s (0x%x)", executorch::runtime::to_string(e), (unsigned)e);
  return buf;
}

std::vector<int64_t> parse_ints(const std::string& s, const char* what) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0') fail(2, std::string("bad ") + what + " value '" + item + "' (want comma-separated integers)");
    out.push_back(v);
  }
  return out;
}

struct Options {
  std::string pte;
  std::vector<int64_t> prompt;
  int64_t new_tokens = 8;
  std::set<int64_t> logits_steps;
  bool prefill_logits = false;
  std::string logits_out;
  int threads = 1;
  bool json = false;
};

Options parse_args(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) fail(2, std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--prompt") o.prompt = parse_ints(value(i), "--prompt");
    else if (a == "--new-tokens") o.new_tokens = std::atoll(value(i).c_str());
    else if (a == "--logits-steps") for (auto s : parse_ints(value(i), "--logits-steps")) o.logits_steps.insert(s);
    else if (a == "--prefill-logits") o.prefill_logits = true;
    else if (a == "--logits-out") o.logits_out = value(i);
    else if (a == "--threads") o.threads = std::atoi(value(i).c_str());
    else if (a == "--json") o.json = true;
    else if (a == "--verbose") g_verbose = true;
    else if (a == "-h" || a == "--help") {
      std::printf("usage: pte_runner MODEL.pte --prompt IDS [--new-tokens N] [--logits-steps S,..] "
                  "[--prefill-logits] [--logits-out FILE] [--threads N] [--json] [--verbose]\n");
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') fail(2, "unknown option " + a);
    else if (o.pte.empty()) o.pte = a;
    else fail(2, "more than one .pte given");
  }
  if (o.pte.empty()) fail(2, "give a .pte file (pte_runner MODEL.pte --prompt 1,2,3)");
  if (o.prompt.empty()) fail(2, "give the prompt token ids: --prompt 1,2,3");
  if (o.new_tokens < 1) fail(2, "--new-tokens must be >= 1");
  if (o.threads < 1) fail(2, "--threads must be >= 1");
  return o;
}

int64_t constant(Module& m, const char* name) {
  auto r = m.execute(name);
  if (!r.ok() || r->empty() || !(*r)[0].isInt())
    fail(3, std::string("cannot read the constant method ") + name + ": " + error_name(r.error()));
  return (*r)[0].toInt();
}

// ExecuTorch's own log lines: errors (and with --verbose everything) on stderr,
// without the info chatter (cpuinfo probes, thread pool size) of every start.
void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
              const char* msg, size_t len) {
  if (!g_verbose && level != kError && level != kFatal) return;
  std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", (char)level, file, line, (int)len, msg);
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

struct Model {
  Module module;
  int64_t max_seq_len = 0, vocab = 0, pos = 0;
  explicit Model(const std::string& path) : module(path, Module::LoadMode::Mmap) {}
};

void open_model(Model& m, const std::string& path) {
  if (FILE* f = std::fopen(path.c_str(), "rb")) std::fclose(f);
  else fail(2, path + " cannot be opened (missing or unreadable)");
  Error e = m.module.load();
  if (e != Error::Ok)
    fail(2, path + " is not a loadable ExecuTorch program: " + error_name(e) +
                "; the file is truncated or corrupt, or not a .pte: re-export it");
  auto names = m.module.method_names();
  if (!names.ok()) fail(2, path + ": cannot list the methods: " + error_name(names.error()));
  if (!names->count("forward") || !names->count(kMarker))
    fail(2, path + " was not written by dijiang-export (no forward or " + kMarker +
                " method); export it with `dijiang-export export --formats pte`");
  e = m.module.load_method("forward");
  if (e == Error::OperatorMissing || e == Error::NotFound || e == Error::DelegateInvalidCompatibility ||
      e == Error::NotSupported)
    fail(3, path + " needs an operator or backend this runtime lacks (" + error_name(e) +
                "): it was exported for another target or another ExecuTorch version; "
                "re-export it for XNNPACK/CPU with this ExecuTorch version");
  if (e != Error::Ok) fail(3, path + ": loading forward failed: " + error_name(e));
  m.max_seq_len = constant(m.module, "get_max_seq_len");
  m.vocab = constant(m.module, "get_vocab_size");
}

// One forward call on ids[0..n) at m.pos; returns the logits it gave, [1, V] or [n, V] (copied).
std::vector<float> forward(Model& m, const int64_t* ids, int64_t n) {
  auto tokens = make_tensor_ptr({1, (int32_t)n}, std::vector<int64_t>(ids, ids + n));
  auto start = make_tensor_ptr({1}, std::vector<int64_t>{m.pos});
  auto r = m.module.forward({EValue(tokens), EValue(start)});
  if (!r.ok()) fail(3, "forward failed at position " + std::to_string(m.pos) + ": " + error_name(r.error()));
  const auto& t = (*r)[0].toTensor();
  if (t.dim() != 3 || (t.size(1) != n && t.size(1) != 1) || t.size(2) != m.vocab)
    fail(3, "forward returned logits of an unexpected shape (want [1, 1, vocab] or [1, T, vocab])");
  const float* p = t.const_data_ptr<float>();
  m.pos += n;
  return std::vector<float>(p, p + t.size(1) * m.vocab);
}

int64_t argmax(const float* row, int64_t v) {
  return std::max_element(row, row + v) - row;
}

}  // namespace

// Marked no-inline and unmangled: callgrind's --toggle-collect counts instructions
// inside exactly these (the prefill, and each decode step).
// Keeps the last call's logits, or with every_row each position's (one token per call).
extern "C" __attribute__((noinline)) void dj_prefill(Model* m, const std::vector<int64_t>* prompt,
                                                     std::vector<float>* logits, bool every_row) {
  int64_t piece = every_row ? 1 : m->max_seq_len;
  for (size_t s = 0; s < prompt->size(); s += piece) {
    int64_t n = std::min<int64_t>(piece, prompt->size() - s);
    auto part = forward(*m, prompt->data() + s, n);
    if (!every_row) logits->clear();
    logits->insert(logits->end(), part.begin(), part.end());
  }
}

extern "C" __attribute__((noinline)) void dj_decode_step(Model* m, int64_t token, std::vector<float>* logits) {
  *logits = forward(*m, &token, 1);
}

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
  executorch::runtime::runtime_init();
  if (auto* pool = executorch::extension::threadpool::get_threadpool())
    pool->_unsafe_reset_threadpool(o.threads);
  Model m(o.pte);
  open_model(m, o.pte);
  for (auto id : o.prompt)
    if (id < 0 || id >= m.vocab)
      fail(2, "prompt token id " + std::to_string(id) + " is outside [0, " + std::to_string(m.vocab) + ")");

  std::ofstream lout;
  if (!o.logits_out.empty()) {
    lout.open(o.logits_out, std::ios::binary);
    if (!lout) fail(2, "cannot write " + o.logits_out);
  }
  std::vector<std::pair<int64_t, int64_t>> rows;  // (step, rows) written to --logits-out
  std::string shown;                              // without --logits-out: the top 5 of each step
  auto keep = [&](int64_t step, const float* p, int64_t nrows) {
    if (!o.logits_steps.count(step)) return;
    if (lout.is_open()) {
      lout.write(reinterpret_cast<const char*>(p), nrows * m.vocab * sizeof(float));
      rows.emplace_back(step, nrows);
      return;
    }
    const float* row = p + (nrows - 1) * m.vocab;
    std::vector<int64_t> idx(m.vocab);
    for (int64_t i = 0; i < m.vocab; ++i) idx[i] = i;
    int64_t k = std::min<int64_t>(5, m.vocab);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    char buf[64];
    shown += "logits of step " + std::to_string(step) + " (top " + std::to_string(k) + "):";
    for (int64_t i = 0; i < k; ++i) {
      std::snprintf(buf, sizeof buf, " %ld:%.6g", (long)idx[i], row[idx[i]]);
      shown += buf;
    }
    shown += "\n";
  };

  std::vector<int64_t> tokens;
  std::vector<double> decode_ms;
  std::vector<float> logits;
  double t0 = now_ms();
  dj_prefill(&m, &o.prompt, &logits, o.prefill_logits);
  double prefill_ms = now_ms() - t0;
  int64_t T = o.prompt.size();
  const float* last = logits.data() + logits.size() - m.vocab;
  if (o.prefill_logits) keep(0, logits.data(), T); else keep(0, last, 1);
  tokens.push_back(argmax(last, m.vocab));
  for (int64_t step = 1; step < o.new_tokens; ++step) {
    double t = now_ms();
    dj_decode_step(&m, tokens.back(), &logits);
    decode_ms.push_back(now_ms() - t);
    keep(step, logits.data(), 1);
    tokens.push_back(argmax(logits.data(), m.vocab));
  }
  if (lout.is_open()) {
    lout.close();
    if (!lout) fail(2, "writing " + o.logits_out + " failed");
  }

  auto join = [](const auto& v, const char* fmt) {
    std::string s;
    char buf[32];
    for (size_t i = 0; i < v.size(); ++i) {
      std::snprintf(buf, sizeof buf, fmt, v[i]);
      s += (i ? "," : "") + std::string(buf);
    }
    return s;
  };
  if (o.json) {
    std::string r;
    for (size_t i = 0; i < rows.size(); ++i)
      r += (i ? "," : "") + std::string("[") + std::to_string(rows[i].first) + "," + std::to_string(rows[i].second) + "]";
    std::printf("{\"tokens\":[%s],\"prefill_ms\":%.4f,\"decode_ms\":[%s],\"prompt_len\":%lld,"
                "\"vocab_size\":%lld,\"max_seq_len\":%lld,\"threads\":%d,\"logits_rows\":[%s]}\n",
                join(tokens, "%ld").c_str(), prefill_ms, join(decode_ms, "%.4f").c_str(), (long long)T,
                (long long)m.vocab, (long long)m.max_seq_len, o.threads, r.c_str());
  } else {
    std::printf("tokens: %s\n", join(tokens, "%ld").c_str());
    std::printf("prefill: %lld tokens in %.2f ms\n", (long long)T, prefill_ms);
    if (!decode_ms.empty()) {
      auto sorted = decode_ms;
      std::sort(sorted.begin(), sorted.end());
      std::printf("decode: %zu calls, median %.3f ms/token\n", sorted.size(), sorted[sorted.size() / 2]);
    }
    std::fputs(shown.c_str(), stdout);
    for (auto& [step, n] : rows) std::printf("logits of step %lld: %lld row(s) in %s\n", (long long)step,
                                            (long long)n, o.logits_out.c_str());
  }
  return 0;
}
