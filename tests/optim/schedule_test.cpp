// Learning-rate schedules: warm-up, cosine and linear decay, re-warm-up, validation.
#include <lowrank/optim/schedule.hpp>  // first: the header compiles on its own

#include <lowrank/optim/sgd.hpp>

#include "optim_test_support.hpp"

#include <cmath>
#include <numbers>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_schedule {

using namespace lowrank;
using Catch::Matchers::Contains;

TEST_CASE("warm-up ramps linearly from 1/W to 1 over W steps", "[optim][schedule]") {
    const auto kind = GENERATE(ScheduleKind::constant, ScheduleKind::warmup_cosine, ScheduleKind::warmup_linear);
    LrSchedule s(ScheduleOptions{.kind = kind, .warmup_steps = 4, .total_steps = 20, .min_factor = 0.1});
    CHECK(s.factor(0) == Approx(0.25));
    CHECK(s.factor(1) == Approx(0.5));
    CHECK(s.factor(3) == Approx(1.0));
    CHECK(s.factor(4) == Approx(1.0));  // the first decay step starts at 1
}

TEST_CASE("cosine decay: midpoint halfway between 1 and min_factor, end at min_factor",
          "[optim][schedule]") {
    LrSchedule s(ScheduleOptions{
        .kind = ScheduleKind::warmup_cosine, .warmup_steps = 10, .total_steps = 110, .min_factor = 0.1});
    CHECK(s.factor(60) == Approx(0.55).epsilon(1e-12));
    CHECK(s.factor(35) == Approx(0.1 + 0.9 * 0.5 * (1.0 + std::cos(std::numbers::pi * 0.25))).epsilon(1e-12));
    CHECK(s.factor(110) == Approx(0.1).epsilon(1e-15));
    CHECK(s.factor(1000) == Approx(0.1).epsilon(1e-15));
    for (std::int64_t t = 10; t < 110; ++t) CHECK(s.factor(t + 1) <= s.factor(t));
}

TEST_CASE("linear decay and the constant kind", "[optim][schedule]") {
    LrSchedule lin(ScheduleOptions{.kind = ScheduleKind::warmup_linear, .warmup_steps = 0, .total_steps = 100});
    CHECK(lin.factor(0) == Approx(1.0));
    CHECK(lin.factor(25) == Approx(0.75));
    CHECK(lin.factor(50) == Approx(0.5));
    CHECK(lin.factor(100) == 0.0);
    CHECK(lin.factor(150) == 0.0);

    LrSchedule constant;
    CHECK(constant.factor(0) == 1.0);
    CHECK(constant.factor(123456) == 1.0);
}

TEST_CASE("a re-warm-up ramps the factor again and a later one replaces it", "[optim][schedule]") {
    LrSchedule s(ScheduleOptions{.kind = ScheduleKind::warmup_linear, .total_steps = 1000});
    s.rewarm(100, 4);
    CHECK(s.rewarm_state() == LrSchedule::Rewarm{100, 4});
    CHECK(s.factor(99) == Approx(1.0 - 0.099));  // before: unchanged
    CHECK(s.factor(100) == Approx(0.9 * 0.25));
    CHECK(s.factor(101) == Approx(0.899 * 0.5));
    CHECK(s.factor(103) == Approx(0.897 * 1.0));
    CHECK(s.factor(104) == Approx(0.896));  // after: unchanged

    s.rewarm(200, 2);
    CHECK(s.factor(100) == Approx(0.9));  // the earlier one is gone
    CHECK(s.factor(200) == Approx(0.8 * 0.5));
    CHECK(s.factor(201) == Approx(0.799));

    // The state a checkpoint saves restores the same factors.
    LrSchedule restored(s.options());
    restored.set_rewarm_state(s.rewarm_state());
    for (std::int64_t t = 195; t < 205; ++t) CHECK(restored.factor(t) == s.factor(t));
    s.clear_rewarm();
    CHECK(s.factor(200) == Approx(0.8));
}

TEST_CASE("a re-warm-up with a start ramps from that multiple of the factor", "[optim][schedule]") {
    LrSchedule s(ScheduleOptions{.kind = ScheduleKind::warmup_linear, .total_steps = 1000});
    s.rewarm(100, 4, 0.25);
    CHECK(s.rewarm_state() == LrSchedule::Rewarm{100, 4, 0.25});
    CHECK(s.factor(99) == Approx(1.0 - 0.099));
    CHECK(s.factor(100) == Approx(0.9 * (0.25 + 0.75 * 0.25)));
    CHECK(s.factor(102) == Approx(0.898 * (0.25 + 0.75 * 0.75)));
    CHECK(s.factor(103) == Approx(0.897));
    CHECK(s.factor(104) == Approx(0.896));

    // Restored from the saved state, the same factors.
    LrSchedule restored(s.options());
    restored.set_rewarm_state(s.rewarm_state());
    for (std::int64_t t = 98; t < 106; ++t) CHECK(restored.factor(t) == s.factor(t));

    // A start of 0 is the plain re-warm-up.
    LrSchedule plain(s.options()), zero(s.options());
    plain.rewarm(100, 4);
    zero.rewarm(100, 4, 0.0);
    for (std::int64_t t = 98; t < 106; ++t) CHECK(plain.factor(t) == zero.factor(t));

    CHECK_THROWS_WITH(s.rewarm(10, 3, 1.0), Contains("0 <= start < 1, got 1"));
    CHECK_THROWS_WITH(s.rewarm(10, 3, -0.5), Contains("0 <= start < 1, got -0.5"));
    CHECK_THROWS_WITH(s.set_rewarm_state(LrSchedule::Rewarm{10, 3, std::nan("")}), Contains("0 <= start < 1"));
}

TEST_CASE("apply sets the optimizer's lr scale", "[optim][schedule]") {
    Parameter<float> p("w", MatrixF::Zero(1, 1));
    Sgd<float> opt({&p}, SgdOptions{.lr = 0.5});
    LrSchedule s(ScheduleOptions{.warmup_steps = 10});
    CHECK(s.apply(opt, 4) == Approx(0.5));
    CHECK(opt.lr_scale() == Approx(0.5));
}

TEST_CASE("bad schedule options throw", "[optim][schedule]") {
    CHECK_THROWS_WITH(LrSchedule(ScheduleOptions{.kind = ScheduleKind::warmup_cosine, .warmup_steps = 10,
                                                 .total_steps = 10}),
                      Contains("warmup_cosine needs total_steps > warmup_steps, got total_steps = 10"));
    CHECK_THROWS_WITH(LrSchedule(ScheduleOptions{.kind = ScheduleKind::warmup_linear}),
                      Contains("total_steps > warmup_steps"));
    CHECK_THROWS_WITH(LrSchedule(ScheduleOptions{.warmup_steps = -1}), Contains("warmup_steps >= 0"));
    CHECK_THROWS_WITH(LrSchedule(ScheduleOptions{.min_factor = 1.5}), Contains("0 <= min_factor <= 1"));
    LrSchedule s;
    CHECK_THROWS_WITH(s.rewarm(10, -1), Contains("length >= 0"));
    CHECK_THROWS_WITH(s.rewarm(-5, 3), Contains("at_step >= 0"));
    CHECK_THROWS_WITH(s.factor(-1), Contains("step >= 0"));
}

}  // namespace test_schedule
