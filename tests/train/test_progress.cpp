#include <lowrank/train/progress.hpp>

#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_progress {

using Catch::Matchers::Contains;

namespace {

std::string contents(std::FILE* f) {
    std::fflush(f);
    std::rewind(f);
    std::string out;
    for (int c; (c = std::fgetc(f)) != EOF;) out += static_cast<char>(c);
    return out;
}

}  // namespace

TEST_CASE("ProgressBar stays silent when its stream is not a terminal", "[train][progress]") {
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    {
        lowrank::ProgressBar bar(lowrank::ProgressOptions{.stream = f});
        CHECK_FALSE(bar.visible());
        bar.begin_epoch(1, 2, 10);
        for (int s = 1; s <= 10; ++s) bar.update(s, 0.5, 4);
        CHECK(bar.running_loss() == 0.5);
        CHECK(bar.samples() == 40);
        bar.finish();
    }
    CHECK(contents(f).empty());
    std::fclose(f);
}

TEST_CASE("ProgressBar draws epoch, steps, loss, throughput and times, then erases itself",
          "[train][progress]") {
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    lowrank::ProgressBar bar(lowrank::ProgressOptions{.stream = f, .force = true, .min_interval = 3600.0});
    REQUIRE(bar.visible());
    bar.begin_epoch(3, 10, 4);
    bar.update(1, 1.0, 2);  // first update always draws
    bar.update(2, 3.0, 2);  // throttled: min_interval not reached
    bar.update(4, 2.0, 4);  // the last step always draws
    CHECK(bar.running_loss() == Approx((1.0 * 2 + 3.0 * 2 + 2.0 * 4) / 8));
    const std::string drawn = contents(f);
    CHECK_THAT(drawn, Contains("epoch 3/10") && Contains("1/4") && Contains("4/4") && Contains("loss 1.0000") &&
                          Contains("loss 2.0000") && Contains("samples/s"));
    CHECK_THAT(drawn, !Contains("2/4"));
    bar.finish();
    const std::string after = contents(f);
    CHECK(after.size() > drawn.size());
    CHECK(after.substr(drawn.size()) == "\r\033[K");
    bar.clear();  // idempotent: nothing more
    CHECK(contents(f) == after);
    std::fclose(f);
}

TEST_CASE("ProgressBar for a run without epochs draws steps and the rate in its unit", "[train][progress]") {
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    lowrank::ProgressBar bar(lowrank::ProgressOptions{.stream = f, .force = true, .unit = "tokens"});
    bar.begin(1000);
    bar.update(1, 6.5, 4096);
    const std::string drawn = contents(f);
    CHECK_THAT(drawn, Contains("step [") && Contains("1/1000") && Contains("tokens/s"));
    CHECK_THAT(drawn, !Contains("epoch") && !Contains("samples/s"));
    bar.finish();
    std::fclose(f);
}

TEST_CASE("ProgressBar can be disabled outright", "[train][progress]") {
    lowrank::ProgressBar bar(lowrank::ProgressOptions{.enabled = false, .force = true});
    CHECK_FALSE(bar.visible());
}

TEST_CASE("format_duration and format_rate", "[train][progress]") {
    CHECK(lowrank::detail::format_duration(0) == "00:00");
    CHECK(lowrank::detail::format_duration(65.4) == "01:05");
    CHECK(lowrank::detail::format_duration(3725) == "1:02:05");
    CHECK(lowrank::detail::format_duration(-1) == "--:--");
    CHECK(lowrank::detail::format_rate(950) == "950");
    CHECK(lowrank::detail::format_rate(14234) == "14.2k");
    CHECK(lowrank::detail::format_rate(3.1e6) == "3.10M");
}

}  // namespace test_progress
