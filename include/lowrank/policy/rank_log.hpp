#pragma once
// The rank log: every decision a rank policy takes (a rank grown, a layer switched to
// low rank, a restart, a re-SVD, a compression), with the statistic that decided it. Kept
// in memory for tests and plots, written out as JSON lines and saved in checkpoints.
//
// One JSON shape everywhere (a line of write_jsonl, an element of to_json()):
//
//     {"epoch":0,"event":"grow","layer":"layers.0","new_rank":9,"old_rank":2,
//      "policy":"inrank","statistic":"explained_ratio","step":225,"value":0.912}
//
// "statistic" is omitted when the event has none (empty), "value" when it is NaN (JSON
// has no NaN; an infinite value, which JSON cannot hold either, is omitted too). The
// reader also takes "statistic": "" and "value": null for them.

#include <lowrank/core/atomic_file.hpp>
#include <lowrank/core/error.hpp>
#include <lowrank/core/json_codec.hpp>
#include <lowrank/core/types.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
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
    std::string statistic;        // what decided it, e.g. "explained_ratio"; empty for none
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
    /// The events of one kind ("grow", "switch", ...), in order.
    std::vector<RankEvent> of_event(const std::string& event) const {
        std::vector<RankEvent> out;
        for (const auto& e : events_)
            if (e.event == event) out.push_back(e);
        return out;
    }

    /// One event as JSON (the shape at the top of this file).
    static nlohmann::json to_json(const RankEvent& e) {
        nlohmann::json j = {{"step", e.step},        {"epoch", e.epoch}, {"policy", e.policy},
                            {"layer", e.layer},      {"event", e.event}, {"old_rank", e.old_rank},
                            {"new_rank", e.new_rank}};
        if (!e.statistic.empty()) j["statistic"] = e.statistic;
        if (std::isfinite(e.value)) j["value"] = e.value;
        return j;
    }

    /// Reads what to_json(const RankEvent&) writes. `index` is the event's place in its log,
    /// for the messages: a FormatError "RankLog::from_json: event <index>: key '<key>':
    /// expected <what>, got <value>" (or "missing key '<key>'"). Other keys are ignored.
    static RankEvent event_from_json(const nlohmann::json& j, std::size_t index) {
        const std::string where = detail::concat("RankLog::from_json: event ", index);
        if (!j.is_object()) detail::json_type_error(where, {}, "an object", j);
        const auto integer = [&](const char* key) {
            const nlohmann::json& v = detail::json_member(where, j, {}, key, "an integer");
            if (!v.is_number_integer() ||
                (v.is_number_unsigned() &&
                 v.get<std::uint64_t>() >
                     static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())))
                detail::json_type_error(where, key, "an integer", v);
            return v.get<std::int64_t>();
        };
        const auto string = [&](const char* key) {
            const nlohmann::json& v = detail::json_member(where, j, {}, key, "a string");
            if (!v.is_string()) detail::json_type_error(where, key, "a string", v);
            return v.get<std::string>();
        };
        RankEvent e;
        e.step = integer("step");
        e.epoch = integer("epoch");
        e.policy = string("policy");
        e.layer = string("layer");
        e.event = string("event");
        e.old_rank = static_cast<Index>(integer("old_rank"));
        e.new_rank = static_cast<Index>(integer("new_rank"));
        if (const auto it = j.find("statistic"); it != j.end()) {
            if (!it->is_string()) detail::json_type_error(where, "statistic", "a string (or no key)", *it);
            e.statistic = it->get<std::string>();
        }
        if (const auto it = j.find("value"); it != j.end() && !it->is_null()) {
            if (!it->is_number()) detail::json_type_error(where, "value", "a number, null or no key", *it);
            e.value = it->get<double>();
        }
        return e;
    }

    /// The whole log as a JSON array of events, in order.
    nlohmann::json to_json() const {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& e : events_) out.push_back(to_json(e));
        return out;
    }

    /// Reads what to_json() writes; errors name the event's index and the key.
    static RankLog from_json(const nlohmann::json& j) {
        if (!j.is_array()) detail::json_type_error("RankLog::from_json", {}, "an array of events", j);
        RankLog log;
        log.events_.reserve(j.size());
        for (std::size_t i = 0; i < j.size(); ++i) log.add(event_from_json(j[i], i));
        return log;
    }

    /// Writes every event as one JSON line (detail::to_json_line(to_json(e)): bytes that are
    /// not valid UTF-8 become U+FFFD), atomically (write_file_atomically), so a reader never
    /// sees a half-written log.
    void write_jsonl(const std::filesystem::path& path) const {
        write_file_atomically(path, "RankLog::write_jsonl", [&](const auto& put) {
            for (const auto& e : events_) {
                const std::string line = detail::to_json_line(to_json(e)) + '\n';
                put(line.data(), line.size());
            }
        });
    }

private:
    std::vector<RankEvent> events_;
};

}  // namespace lowrank
