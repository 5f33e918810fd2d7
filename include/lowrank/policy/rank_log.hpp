#pragma once
// The rank log: every decision a rank policy takes (a rank grown, a layer switched to
// low rank, a restart, a re-SVD, a compression), with the statistic that decided it. Kept
// in memory for tests and plots, written out as JSON lines.

#include <lowrank/core/error.hpp>
#include <lowrank/core/types.hpp>
#include <lowrank/train/metrics_log.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
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

    /// Writes every event as one JSON line, to a temporary file renamed over `path` at
    /// the end, so a reader never sees a half-written log.
    void write_jsonl(const std::filesystem::path& path) const {
        const std::filesystem::path tmp = path.string() + ".tmp";
        {
            std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
            check(out.good(), "RankLog", "cannot open '", tmp.string(), "' for writing");
            for (const auto& e : events_) out << to_json(e).str() << '\n';
            out.flush();
            check(out.good(), "RankLog", "writing '", tmp.string(), "' failed");
        }
        std::error_code ec;
        std::filesystem::rename(tmp, path, ec);
        check(!ec, "RankLog", "cannot rename '", tmp.string(), "' to '", path.string(), "': ", ec.message());
    }

private:
    std::vector<RankEvent> events_;
};

}  // namespace lowrank
