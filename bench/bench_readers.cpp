// Readers on large headers (docs/reliability.md): SafetensorsReader on a header of N small
// entries, and parse_json_bounded on that header alone. A header of 80,000 entries once
// took minutes (a parser callback made nlohmann's parse quadratic); the counters show it is
// linear: bytes and entries per second stay level as N grows.
#include "bench_common.hpp"

#include <lowrank/core/json_read.hpp>
#include <lowrank/io/safetensors.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

namespace {

/// {"t0": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t1": ...}
std::string header_of(int n) {
    std::string h = "{";
    for (int i = 0; i < n; ++i) {
        if (i > 0) h += ',';
        h += "\"t";
        h += std::to_string(i);
        h += R"(":{"dtype":"F32","shape":[1],"data_offsets":[)";
        h += std::to_string(4 * i);
        h += ',';
        h += std::to_string(4 * i + 4);
        h += "]}";
    }
    return h + "}";
}

void BM_SafetensorsReader(benchmark::State& state) {
    const int n = static_cast<int>(state.range(0));
    const std::string header = header_of(n);
    const std::string path = (std::filesystem::temp_directory_path() /
                              ("lowrank-bench-readers-" + std::to_string(::getpid()) + ".safetensors"))
                                 .string();
    {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        const std::uint64_t len = header.size();
        for (int i = 0; i < 8; ++i) f.put(static_cast<char>(len >> (8 * i)));
        f << header << std::string(static_cast<std::size_t>(4 * n), '\0');
    }
    for (auto _ : state) {
        const lowrank::SafetensorsReader r(path);
        benchmark::DoNotOptimize(r.names().size());
    }
    std::remove(path.c_str());
    const auto iterations = static_cast<double>(state.iterations());
    state.counters["header_bytes_per_second"] =
        benchmark::Counter(iterations * static_cast<double>(header.size()), benchmark::Counter::kIsRate);
    state.counters["entries_per_second"] = benchmark::Counter(iterations * n, benchmark::Counter::kIsRate);
}

void BM_ParseJsonBounded(benchmark::State& state) {
    const int n = static_cast<int>(state.range(0));
    const std::string header = header_of(n);
    for (auto _ : state) {
        const nlohmann::json j = lowrank::detail::parse_json_bounded(header, {}, "bench");
        benchmark::DoNotOptimize(j.size());
    }
    const auto iterations = static_cast<double>(state.iterations());
    state.counters["bytes_per_second"] =
        benchmark::Counter(iterations * static_cast<double>(header.size()), benchmark::Counter::kIsRate);
    state.counters["entries_per_second"] = benchmark::Counter(iterations * n, benchmark::Counter::kIsRate);
}

}  // namespace

BENCHMARK(BM_SafetensorsReader)->ArgName("entries")->Arg(10000)->Arg(80000)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ParseJsonBounded)->ArgName("entries")->Arg(10000)->Arg(80000)->UseRealTime()->Unit(benchmark::kMillisecond);
