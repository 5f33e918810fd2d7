#include <lowrank/data/batching.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_batching {

using lowrank::Batcher;
using lowrank::BatcherOptions;
using lowrank::Index;

namespace {

/// All batches of one epoch, through the range interface.
std::vector<std::vector<Index>> epoch_batches(Batcher& b, std::int64_t epoch) {
    std::vector<std::vector<Index>> out;
    for (std::span<const Index> idx : b.epoch(epoch)) out.emplace_back(idx.begin(), idx.end());
    return out;
}

std::vector<Index> flatten(const std::vector<std::vector<Index>>& batches) {
    std::vector<Index> out;
    for (const auto& b : batches) out.insert(out.end(), b.begin(), b.end());
    return out;
}

}  // namespace

TEST_CASE("Batcher covers every index exactly once per epoch and keeps the last partial batch",
          "[data][batching]") {
    Batcher b(1000, BatcherOptions{.batch_size = 64, .seed = 3});
    CHECK(b.batches_per_epoch() == 16);
    CHECK(b.samples_per_epoch() == 1000);
    for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
        const auto batches = epoch_batches(b, epoch);
        REQUIRE(batches.size() == 16);
        for (std::size_t i = 0; i + 1 < batches.size(); ++i) CHECK(batches[i].size() == 64);
        CHECK(batches.back().size() == 1000 - 15 * 64);
        auto all = flatten(batches);
        std::sort(all.begin(), all.end());
        std::vector<Index> expected(1000);
        for (Index i = 0; i < 1000; ++i) expected[static_cast<std::size_t>(i)] = i;
        CHECK(all == expected);
    }
}

TEST_CASE("Batcher with drop_last serves only full batches of distinct indices", "[data][batching]") {
    Batcher b(1000, BatcherOptions{.batch_size = 64, .drop_last = true, .seed = 3});
    CHECK(b.batches_per_epoch() == 15);
    CHECK(b.samples_per_epoch() == 960);
    const auto batches = epoch_batches(b, 0);
    REQUIRE(batches.size() == 15);
    for (const auto& batch : batches) CHECK(batch.size() == 64);
    auto all = flatten(batches);
    std::sort(all.begin(), all.end());
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
    CHECK(all.front() >= 0);
    CHECK(all.back() < 1000);
}

TEST_CASE("Batcher is reproducible from its seed, and epochs and seeds differ", "[data][batching]") {
    Batcher a(500, BatcherOptions{.batch_size = 32, .seed = 42});
    Batcher b(500, BatcherOptions{.batch_size = 32, .seed = 42});
    Batcher other(500, BatcherOptions{.batch_size = 32, .seed = 43});
    const auto a0 = flatten(epoch_batches(a, 0)), a1 = flatten(epoch_batches(a, 1));
    CHECK(a0 == flatten(epoch_batches(b, 0)));
    CHECK(a1 == flatten(epoch_batches(b, 1)));
    CHECK(a0 != a1);
    CHECK(a0 != flatten(epoch_batches(other, 0)));
    // An epoch's order depends only on (seed, epoch): visiting epochs out of order (a
    // resumed run) gives the same batches.
    Batcher resumed(500, BatcherOptions{.batch_size = 32, .seed = 42});
    CHECK(flatten(epoch_batches(resumed, 1)) == a1);
    CHECK(flatten(epoch_batches(resumed, 0)) == a0);
}

TEST_CASE("Batcher::next walks the same batches as the range, then returns empty", "[data][batching]") {
    Batcher b(10, BatcherOptions{.batch_size = 4, .seed = 9});
    const auto via_range = epoch_batches(b, 2);
    b.set_epoch(2);
    CHECK(b.current_epoch() == 2);
    std::vector<std::vector<Index>> via_next;
    while (!b.done()) {
        const auto idx = b.next();
        via_next.emplace_back(idx.begin(), idx.end());
    }
    CHECK(via_next == via_range);
    CHECK(b.next().empty());
    CHECK(b.position() == 3);
    b.seek(2);
    const auto last = b.next();
    CHECK(std::vector<Index>(last.begin(), last.end()) == via_range[2]);
}

TEST_CASE("Batcher without shuffle serves 0, 1, 2, ... every epoch", "[data][batching]") {
    Batcher b(7, BatcherOptions{.batch_size = 3, .shuffle = false});
    for (std::int64_t epoch : {0, 5}) {
        const auto batches = epoch_batches(b, epoch);
        CHECK(batches == std::vector<std::vector<Index>>{{0, 1, 2}, {3, 4, 5}, {6}});
    }
}

TEST_CASE("Batcher's Fisher-Yates shuffle makes every permutation about equally likely",
          "[data][batching]") {
    // 3 items have 6 orders; over 6000 epochs each should appear ~1000 times (sd ~ 29).
    Batcher b(3, BatcherOptions{.batch_size = 3, .seed = 11});
    std::map<std::vector<Index>, int> counts;
    for (std::int64_t epoch = 0; epoch < 6000; ++epoch) {
        b.set_epoch(epoch);
        const auto order = b.order();
        ++counts[std::vector<Index>(order.begin(), order.end())];
    }
    REQUIRE(counts.size() == 6);
    for (const auto& [order, n] : counts) CHECK((n > 850 && n < 1150));
}

TEST_CASE("Batcher handles empty data sets and rejects bad options", "[data][batching][errors]") {
    Batcher empty(0, BatcherOptions{.batch_size = 8});
    CHECK(empty.batches_per_epoch() == 0);
    CHECK(epoch_batches(empty, 0).empty());
    CHECK(empty.next().empty());
    CHECK_THROWS_AS(Batcher(10, BatcherOptions{.batch_size = 0}), lowrank::Error);
    CHECK_THROWS_AS(Batcher(-1), lowrank::Error);
    Batcher b(10, BatcherOptions{.batch_size = 4});
    CHECK_THROWS_AS(b.set_epoch(-1), lowrank::Error);
    CHECK_THROWS_AS(b.batch(3), lowrank::Error);
    CHECK_THROWS_AS(b.seek(4), lowrank::Error);
}

TEST_CASE("gather_rows copies the chosen rows into a reused buffer", "[data][batching]") {
    lowrank::Matrix<float> src(5, 3);
    for (Index i = 0; i < 5; ++i)
        for (Index j = 0; j < 3; ++j) src(i, j) = static_cast<float>(10 * i + j);
    const std::vector<std::int32_t> labels{0, 1, 2, 3, 4};

    lowrank::Matrix<float> x;
    std::vector<std::int32_t> y;
    const std::array<Index, 2> first{4, 1};
    lowrank::gather_rows(src, first, x);
    lowrank::gather_rows(labels, first, y);
    REQUIRE(x.rows() == 2);
    REQUIRE(x.cols() == 3);
    CHECK(x.row(0) == src.row(4));
    CHECK(x.row(1) == src.row(1));
    CHECK(y == std::vector<std::int32_t>{4, 1});

    // Same batch size: the buffers are reused, not reallocated.
    const float* x_data = x.data();
    const std::int32_t* y_data = y.data();
    const std::array<Index, 2> second{0, 3};
    lowrank::gather_rows(src, second, x);
    lowrank::gather_rows(labels, second, y);
    CHECK(x.data() == x_data);
    CHECK(y.data() == y_data);
    CHECK(x.row(0) == src.row(0));
    CHECK(x.row(1) == src.row(3));
    CHECK(y == std::vector<std::int32_t>{0, 3});

    // A smaller label batch keeps the vector's storage.
    const std::array<Index, 1> third{2};
    lowrank::gather_rows(labels, third, y);
    CHECK(y.data() == y_data);
    CHECK(y == std::vector<std::int32_t>{2});
}

TEST_CASE("gather_rows rejects indices out of range, naming the index", "[data][batching][errors]") {
    const lowrank::Matrix<float> src = lowrank::Matrix<float>::Zero(3, 2);
    lowrank::Matrix<float> x;
    const std::array<Index, 2> bad{1, 3};
    CHECK_THROWS_WITH(lowrank::gather_rows(src, bad, x), Catch::Matchers::Contains("[0, 3)") &&
                                                              Catch::Matchers::Contains("got 3"));
    std::vector<int> labels{1, 2, 3}, y;
    const std::array<Index, 1> negative{-1};
    CHECK_THROWS_AS(lowrank::gather_rows(labels, negative, y), lowrank::Error);
}

}  // namespace test_batching
