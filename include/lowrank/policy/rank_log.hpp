#pragma once
// The rank log: every decision a rank policy takes (a rank grown, a layer switched to
// low rank, a restart, a re-SVD, a compression), with the statistic that decided it. Kept
// in memory for tests and plots, written out as JSON lines.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/train/metrics_log.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace lowrank {

struct RankEvent {
    std::int64_t step = 0;   // optimizer steps taken when the decision was made
    std::int64_t epoch = 0;  // 0-based epoch in which it was made
    std::string policy;      // "inrank", "cuttlefish", ...
    std::string layer;       // the layer's name, e.g. "layers.0"
    std::string event;       // "init", "grow", "truncate", "switch", "restart", "resvd", "compress", ...
    Index old_rank = 0;
    Index new_rank = 0;
    std::string statistic;  // what decided it, e.g. "explained_ratio"; empty for none
    double value = std::nan("");  // its value (NaN for none)
};

class RankLog {
public:
    void add(RankEvent e) { events_.push_back(std::move(e)); }

    const std::vector<RankEvent>& events() const { return events_; }
    std::size_t size() const { return events_.size(); }
    bool empty() const { return events_.empty(); }
    void clear() { events_.clear(); }

    /// The events of one layer (in order).
    std::vector<RankEvent> of_layer(const std::string& layer) const {
        std::vector<RankEvent> out;
        for (const auto& e : events_)
            if (e.layer == layer) out.push_back(e);
        return out;
    }

    static JsonLine to_json(const RankEvent& e) {
        JsonLine line;
        line.field("step", e.step)
            .field("epoch", e.epoch)
            .field("policy", e.policy)
            .field("layer", e.layer)
            .field("event", e.event)
            .field("old_rank", e.old_rank)
            .field("new_rank", e.new_rank);
        if (!e.statistic.empty()) line.field("statistic", e.statistic);
        if (std::isfinite(e.value)) line.field("value", e.value);
        return line;
    }

    /// Writes every event as one JSON line, atomically (write_file_atomically), so a reader
    /// never sees a half-written log.
    void write_jsonl(const std::filesystem::path& path) const {
        write_file_atomically(path, "RankLog::write_jsonl", [&](const auto& put) {
            for (const auto& e : events_) {
                const std::string line = to_json(e).str() + '\n';
                put(line.data(), line.size());
            }
        });
    }

private:
    std::vector<RankEvent> events_;
};

}  // namespace lowrank
