// carry_state: every kind for every optimizer, and the layout guard that makes the call
// mandatory after a change of shape or basis.
#include <lowrank/optim/optimizer.hpp>  // first: the header compiles on its own

#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>

#include "optim_test_support.hpp"

#include <map>
#include <memory>
#include <string>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_carry_state {

using namespace lowrank;
using Catch::Matchers::Contains;
using lowrank::test::make_param;
using lowrank::test::set_grad;

namespace {

template <class T>
std::unique_ptr<Optimizer<T>> make_optimizer(const std::string& kind, ParameterList<T> params) {
    if (kind == "sgd-momentum")
        return std::make_unique<Sgd<T>>(std::move(params),
                                        SgdOptions{.lr = 0.1, .momentum = 0.9, .dampening = 0.2});
    if (kind == "sgd-nesterov")
        return std::make_unique<Sgd<T>>(std::move(params),
                                        SgdOptions{.lr = 0.1, .momentum = 0.9, .nesterov = true});
    if (kind == "adam") return std::make_unique<Adam<T>>(std::move(params), AdamOptions{.lr = 0.01});
    if (kind == "adamw")
        return std::make_unique<AdamW<T>>(std::move(params), AdamOptions{.lr = 0.01, .weight_decay = 0.1});
    throw Error("unknown optimizer kind " + kind);
}

/// A copy of every moment the optimizer keeps for p.
std::map<std::string, MatrixD> moments_of(const Optimizer<double>& opt, const Parameter<double>& p) {
    std::map<std::string, MatrixD> out;
    const auto* s = opt.state_of(p);
    REQUIRE(s != nullptr);
    for (auto name : opt.moment_names()) out[std::string(name)] = s->moment(name);
    return out;
}

/// The parameter grown or shrunk to (rows x cols), keeping its leading block, as a rank
/// policy would: through set_value, which bumps the layout version.
void reshape(Parameter<double>& p, Index rows, Index cols) {
    MatrixD v = MatrixD::Constant(rows, cols, 0.5);
    const Index r = std::min(rows, p.rows()), c = std::min(cols, p.cols());
    v.topLeftCorner(r, c) = p.value.topLeftCorner(r, c);
    p.set_value(std::move(v));
}

void take_steps(Optimizer<double>& opt, Parameter<double>& p, int from, int count) {
    for (int t = from; t < from + count; ++t) {
        set_grad(p, t);
        opt.step();
    }
}

}  // namespace

TEST_CASE("carry_state carries every moment of every optimizer", "[optim][carry]") {
    const std::string kind = GENERATE("sgd-momentum", "sgd-nesterov", "adam", "adamw");
    INFO(kind);
    auto p = make_param<double>("h.0.U", 3, 2);
    auto opt = make_optimizer<double>(kind, {&p});
    take_steps(*opt, p, 0, 2);
    const auto before = moments_of(*opt, p);
    REQUIRE(!before.empty());
    for (const auto& [name, m] : before) REQUIRE((m.array() != 0.0).all());

    SECTION("grow keeps the old block and zeros the new columns and rows") {
        reshape(p, 4, 5);
        const MatrixD value_before = p.value;
        CHECK_THROWS_WITH(opt->step(), Contains("parameter 'h.0.U': layout changed from (3 x 2) to (4 x 5) "
                                                "without carry_state"));
        CHECK(p.value == value_before);  // the failed step touched nothing
        opt->carry_state(p, StateCarry::grow());
        const auto* s = opt->state_of(p);
        CHECK(s->step == 2);
        CHECK(s->rows == 4);
        CHECK(s->cols == 5);
        CHECK(s->layout_version == p.layout_version());
        for (const auto& [name, old] : before) {
            INFO(name);
            const MatrixD& m = s->moment(name);
            REQUIRE(m.rows() == 4);
            REQUIRE(m.cols() == 5);
            CHECK(m.topLeftCorner(3, 2) == old);
            CHECK(m.rightCols(3).isZero(0.0));
            CHECK(m.bottomRows(1).isZero(0.0));
        }
        take_steps(*opt, p, 2, 1);
        CHECK(opt->state_of(p)->step == 3);
    }

    SECTION("slice keeps the leading rows and columns") {
        reshape(p, 2, 1);
        CHECK_THROWS_WITH(opt->step(), Contains("layout changed from (3 x 2) to (2 x 1)"));
        opt->carry_state(p, StateCarry::slice());
        const auto* s = opt->state_of(p);
        CHECK(s->step == 2);
        for (const auto& [name, old] : before) {
            INFO(name);
            const MatrixD& m = s->moment(name);
            REQUIRE(m.rows() == 2);
            REQUIRE(m.cols() == 1);
            CHECK(m == old.topLeftCorner(2, 1));
        }
        take_steps(*opt, p, 2, 1);
        CHECK(opt->state_of(p)->step == 3);
    }

    SECTION("reset_columns zeros exactly those columns after a change of basis") {
        p.bump_layout();
        CHECK_THROWS_WITH(opt->step(), Contains("parameter 'h.0.U': layout changed (a change of basis"));
        opt->carry_state(p, StateCarry::reset_columns({1}));
        const auto* s = opt->state_of(p);
        CHECK(s->step == 2);
        for (const auto& [name, old] : before) {
            INFO(name);
            const MatrixD& m = s->moment(name);
            CHECK(m.col(0) == old.col(0));
            CHECK(m.col(1).isZero(0.0));
        }
        take_steps(*opt, p, 2, 1);
    }

    SECTION("reset_rows zeros exactly those rows") {
        p.bump_layout();
        opt->carry_state(p, StateCarry::reset_rows({0, 2}));
        for (const auto& [name, old] : before) {
            INFO(name);
            const MatrixD& m = opt->state_of(p)->moment(name);
            CHECK(m.row(0).isZero(0.0));
            CHECK(m.row(1) == old.row(1));
            CHECK(m.row(2).isZero(0.0));
        }
        take_steps(*opt, p, 2, 1);
    }

    SECTION("reset_all zeros everything and the next update equals a first step") {
        p.bump_layout();
        opt->carry_state(p, StateCarry::reset_all());
        const auto* s = opt->state_of(p);
        CHECK(s->step == 0);
        for (const auto& [name, old] : before) CHECK(s->moment(name).isZero(0.0));

        Parameter<double> fresh_p("fresh", p.value);
        auto fresh = make_optimizer<double>(kind, {&fresh_p});
        set_grad(p, 7);
        set_grad(fresh_p, 7);
        opt->step();
        fresh->step();
        CHECK(p.value == fresh_p.value);
        CHECK(moments_of(*opt, p) == moments_of(*fresh, fresh_p));
        CHECK(opt->state_of(p)->step == 1);
    }

    SECTION("reset_all also takes a new shape") {
        reshape(p, 3, 4);
        opt->carry_state(p, StateCarry::reset_all());
        for (const auto& [name, old] : before) {
            const MatrixD& m = opt->state_of(p)->moment(name);
            CHECK(m.rows() == 3);
            CHECK(m.cols() == 4);
            CHECK(m.isZero(0.0));
        }
        take_steps(*opt, p, 2, 1);
    }

    SECTION("drop forgets the state; the next step starts fresh") {
        reshape(p, 3, 3);
        opt->carry_state(p, StateCarry::drop());
        CHECK_FALSE(opt->has_state(p.id()));
        CHECK(opt->state_of(p) == nullptr);

        Parameter<double> fresh_p("fresh", p.value);
        auto fresh = make_optimizer<double>(kind, {&fresh_p});
        set_grad(p, 4);
        set_grad(fresh_p, 4);
        opt->step();
        fresh->step();
        CHECK(p.value == fresh_p.value);
        CHECK(opt->state_of(p)->step == 1);
    }

    SECTION("drop_state does the same by id") {
        opt->drop_state(p.id());
        CHECK_FALSE(opt->has_state(p.id()));
        take_steps(*opt, p, 2, 1);
        CHECK(opt->state_of(p)->step == 1);
    }

    SECTION("a carry of the wrong kind for the change is refused") {
        reshape(p, 3, 1);
        CHECK_THROWS_WITH(opt->carry_state(p, StateCarry::grow()),
                          Contains("grow cannot shrink the state from (3 x 2) to (3 x 1)"));
        CHECK_THROWS_WITH(opt->carry_state(p, StateCarry::reset_columns({0})),
                          Contains("needs an unchanged shape"));
        reshape(p, 3, 4);
        CHECK_THROWS_WITH(opt->carry_state(p, StateCarry::slice()), Contains("slice cannot enlarge"));
        CHECK_THROWS_WITH(opt->carry_state(p, StateCarry::reset_columns({4})),
                          Contains("column indices in [0, 4), got 4"));
        CHECK_THROWS_WITH(opt->carry_state(p, StateCarry::reset_rows({-1})), Contains("row indices"));
        // Refused carries leave the state as it was, so the guard still fires.
        CHECK_THROWS_WITH(opt->step(), Contains("without carry_state"));
    }

    SECTION("a shape changed behind the layout version's back is caught too") {
        p.value = MatrixD::Zero(3, 3);  // bypasses set_value: same version, new shape
        p.grad = MatrixD::Zero(3, 3);
        CHECK_THROWS_WITH(opt->step(), Contains("shape changed from (3 x 2) to (3 x 3) but its layout "
                                                "version did not"));
    }
}

TEST_CASE("carry_state on a parameter without state is a no-op", "[optim][carry]") {
    const std::string kind = GENERATE("sgd-momentum", "adam", "adamw");
    auto p = make_param<double>("never.stepped", 2, 2);
    auto opt = make_optimizer<double>(kind, {&p});
    reshape(p, 2, 4);
    CHECK_NOTHROW(opt->carry_state(p, StateCarry::grow()));
    CHECK_NOTHROW(opt->carry_state(p, StateCarry::slice()));
    CHECK_NOTHROW(opt->carry_state(p, StateCarry::reset_all()));
    CHECK_NOTHROW(opt->carry_state(p, StateCarry::drop()));
    CHECK_FALSE(opt->has_state(p.id()));
    take_steps(*opt, p, 0, 1);  // the first step takes the new shape as it is
    CHECK(opt->state_of(p)->cols == 4);
}

TEST_CASE("carry_state with SGD without momentum only re-stamps the layout", "[optim][carry]") {
    auto p = make_param<double>("w", 2, 2);
    Sgd<double> opt({&p}, SgdOptions{.lr = 0.1});
    take_steps(opt, p, 0, 1);
    reshape(p, 2, 3);
    CHECK_THROWS_WITH(opt.step(), Contains("without carry_state"));
    opt.carry_state(p, StateCarry::grow());
    CHECK_NOTHROW(take_steps(opt, p, 1, 1));
    CHECK(opt.state_of(p)->step == 2);
}

TEST_CASE("set_state installs a saved state and checks its shapes", "[optim][carry]") {
    auto p = make_param<double>("w", 2, 3);
    Adam<double> opt({&p}, AdamOptions{.lr = 0.01});
    take_steps(opt, p, 0, 2);
    const OptimizerState<double> saved = *opt.state_of(p);

    Parameter<double> q("w", p.value);  // the saved weights
    q.zero_grad();
    Adam<double> restored({&q}, AdamOptions{.lr = 0.01});
    restored.set_state(q, saved);
    take_steps(opt, p, 2, 1);
    take_steps(restored, q, 2, 1);
    CHECK(q.value == p.value);  // a resumed run continues exactly

    OptimizerState<double> bad = saved;
    bad.exp_avg_sq = MatrixD::Zero(3, 2);
    CHECK_THROWS_WITH(restored.set_state(q, bad), Contains("moment exp_avg_sq: expected shape (2 x 3), got (3 x 2)"));
    CHECK_THROWS_WITH(saved.moment("velocity"), Contains("\"velocity\""));
}

}  // namespace test_carry_state
