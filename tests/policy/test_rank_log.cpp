// The rank log's JSON: one shape for a JSON line and for a saved log, read back exactly,
// and a malformed event refused with its index and key.
#include <catch2/catch.hpp>

#include <lowrank/policy/rank_log.hpp>

#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_rank_log {

using Catch::Contains;
using lowrank::FormatError;
using lowrank::RankEvent;
using lowrank::RankLog;
using nlohmann::json;

namespace {

RankLog sample_log() {
    RankLog log;
    log.add(RankEvent{12, 1, "inrank", "layers.0", "grow", 2, 5, "explained_ratio", 0.1 + 0.2});
    log.add(RankEvent{12, 1, "inrank", "layers.1", "init", 0, 2, "", std::nan("")});
    log.add(RankEvent{40, 2, "sst", "blocks.3.attn.c_proj", "resvd", 7, 7, "orthogonality_error",
                      std::numeric_limits<double>::denorm_min()});
    log.add(RankEvent{std::numeric_limits<std::int64_t>::max(), 0, "lora", "h\xC3\xA9", "init", -1, 3,
                      "width", -1.2345678901234567e-300});
    return log;
}

void check_same(const RankLog& a, const RankLog& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        const RankEvent& x = a.events()[i];
        const RankEvent& y = b.events()[i];
        INFO("event " << i << ": " << RankLog::to_json(x).dump());
        CHECK(x.step == y.step);
        CHECK(x.epoch == y.epoch);
        CHECK(x.policy == y.policy);
        CHECK(x.layer == y.layer);
        CHECK(x.event == y.event);
        CHECK(x.old_rank == y.old_rank);
        CHECK(x.new_rank == y.new_rank);
        CHECK(x.statistic == y.statistic);
        if (std::isnan(x.value))
            CHECK(std::isnan(y.value));
        else
            CHECK(std::bit_cast<std::uint64_t>(x.value) == std::bit_cast<std::uint64_t>(y.value));
    }
}

}  // namespace

TEST_CASE("RankLog round-trips through JSON text, with and without a statistic and a value",
          "[policy][rank_log]") {
    const RankLog log = sample_log();
    const json saved = log.to_json();
    REQUIRE(saved.is_array());
    REQUIRE(saved.size() == 4);
    // No statistic and a NaN value: neither key is written.
    CHECK(saved[0].contains("statistic"));
    CHECK(saved[0].contains("value"));
    CHECK_FALSE(saved[1].contains("statistic"));
    CHECK_FALSE(saved[1].contains("value"));
    CHECK(saved[1] ==
          json::parse(R"({"step":12,"epoch":1,"policy":"inrank","layer":"layers.1","event":"init",)"
                      R"("old_rank":0,"new_rank":2})"));
    check_same(log, RankLog::from_json(json::parse(saved.dump())));
    check_same(RankLog(), RankLog::from_json(json::array()));
}

TEST_CASE("RankLog::write_jsonl writes one line per event in the shape of to_json", "[policy][rank_log]") {
    const RankLog log = sample_log();
    const auto path = std::filesystem::temp_directory_path() / "lowrank_rank_log_roundtrip.jsonl";
    log.write_jsonl(path);
    std::ifstream in(path);
    json lines = json::array();
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    in.close();
    std::filesystem::remove(path);
    CHECK(lines == log.to_json());
    check_same(log, RankLog::from_json(lines));
}

TEST_CASE("A rank event is the same bytes in a JSON line and in a saved log, whatever its names hold",
          "[policy][rank_log]") {
    RankLog log = sample_log();
    log.add(RankEvent{7, 0, "inrank", "bad\xFF\"name\n", "grow", 1, 2, "explained_ratio", 0.5});
    const auto path = std::filesystem::temp_directory_path() / "lowrank_rank_log_bytes.jsonl";
    log.write_jsonl(path);
    std::ifstream in(path);
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    in.close();
    std::filesystem::remove(path);
    const json saved = log.to_json();  // what a checkpoint holds
    REQUIRE(lines.size() == log.size());
    for (std::size_t i = 0; i < log.size(); ++i) {
        INFO("event " << i);
        CHECK(lines[i] == lowrank::detail::to_json_line(saved[i]));
        CHECK(lines[i] == lowrank::detail::to_json_line(RankLog::to_json(log.events()[i])));
    }
    // Keys sorted (nlohmann::json), the invalid byte replaced, the quote and newline escaped.
    CHECK(lines.back() == R"({"epoch":0,"event":"grow","layer":"bad)"
                          "\xEF\xBF\xBD"
                          R"(\"name\n","new_rank":2,"old_rank":1,"policy":"inrank",)"
                          R"("statistic":"explained_ratio","step":7,"value":0.5})");
}

TEST_CASE("RankLog::from_json takes an empty statistic and a null value as none", "[policy][rank_log]") {
    // The shape lowrank-gpt2's checkpoints held before the log had its own serialiser.
    const RankLog log = RankLog::from_json(json::parse(
        R"([{"step":3,"epoch":0,"policy":"relora","layer":"fc1","event":"restart","old_rank":4,"new_rank":4,)"
        R"("statistic":"","value":null},)"
        R"({"step":5,"epoch":0,"policy":"relora","layer":"fc1","event":"restart","old_rank":4,"new_rank":4,)"
        R"("statistic":"merged_update_norm","value":2,"note":"ignored"}])"));
    REQUIRE(log.size() == 2);
    CHECK(log.events()[0].statistic.empty());
    CHECK(std::isnan(log.events()[0].value));
    CHECK(log.events()[1].value == 2.0);
    CHECK(RankLog::to_json(log.events()[0]) ==
          json::parse(R"({"step":3,"epoch":0,"policy":"relora","layer":"fc1","event":"restart",)"
                      R"("old_rank":4,"new_rank":4})"));
}

TEST_CASE("RankLog::from_json refuses a malformed event, naming its index and key", "[policy][rank_log]") {
    const json good =
        RankLog::to_json(RankEvent{1, 0, "inrank", "layers.0", "grow", 2, 3, "explained_ratio", 0.5});
    const auto log_with = [&](const json& bad) { return json::array({good, good, bad}); };

    json bad = good;
    bad.erase("layer");
    CHECK_THROWS_AS(RankLog::from_json(log_with(bad)), FormatError);
    CHECK_THROWS_WITH(RankLog::from_json(log_with(bad)),
                      Contains("RankLog::from_json: event 2: missing key 'layer' (expected a string)"));
    bad = good;
    bad["new_rank"] = "3";
    CHECK_THROWS_WITH(RankLog::from_json(log_with(bad)),
                      Contains("event 2: key 'new_rank': expected an integer, got \"3\""));
    bad = good;
    bad["step"] = 1.5;
    CHECK_THROWS_WITH(RankLog::from_json(log_with(bad)),
                      Contains("event 2: key 'step': expected an integer, got 1.5"));
    bad = good;
    bad["value"] = "high";
    CHECK_THROWS_WITH(RankLog::from_json(log_with(bad)),
                      Contains("event 2: key 'value': expected a number, null or no key, got \"high\""));
    bad = good;
    bad["statistic"] = 7;
    CHECK_THROWS_WITH(RankLog::from_json(log_with(bad)),
                      Contains("event 2: key 'statistic'") && Contains("got 7"));
    CHECK_THROWS_WITH(RankLog::from_json(log_with(json::array())),
                      Contains("event 2: expected an object, got []"));
    CHECK_THROWS_WITH(RankLog::from_json(json::object()),
                      Contains("RankLog::from_json: expected an array of events, got {}"));
}

}  // namespace test_rank_log
