// Parameters whose leading columns alone are trained (IncrementalRankLinear's capacity):
// every optimizer updates exactly those columns, as if they were a parameter of their own.
#include <catch2/catch.hpp>

#include <lowrank/core/init.hpp>
#include <lowrank/optim/optim.hpp>

#include <memory>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_active_columns {

using namespace lowrank;

namespace {

template <class Opt, class Options>
void check_matches_compact(const Options& options) {
    Rng rng(5);
    MatrixD value(4, 6), grad(4, 6);
    init::normal<double>(value, rng);
    Parameter<double> wide("wide", value);
    wide.set_active_cols(3);
    Parameter<double> compact("compact", value.leftCols(3).eval());
    Opt a(ParameterList<double>{&wide}, options), b(ParameterList<double>{&compact}, options);
    for (int step = 0; step < 3; ++step) {
        init::normal<double>(grad, rng);
        grad.rightCols(3).setZero();  // the layer never writes inactive gradient columns
        wide.grad = grad;
        compact.grad = grad.leftCols(3);
        a.step();
        b.step();
    }
    // Equal up to round-off: a row-by-row run may vectorise differently from one long run.
    CHECK((wide.value.leftCols(3) - compact.value).norm() <= 1e-14 * compact.value.norm());
    CHECK(wide.value.rightCols(3) == value.rightCols(3));  // untouched, even by weight decay
    const auto* s = a.state_of(wide);
    REQUIRE(s != nullptr);
    CHECK(s->rows == 4);
    CHECK(s->cols == 3);

    // Growing: two more columns take part, their state starts at zero, the old state stays.
    wide.set_active_cols(5);
    CHECK_THROWS_WITH(a.step(), Catch::Contains("'wide'") && Catch::Contains("(4 x 3) to (4 x 5)"));
    const auto before = *a.state_of(wide);
    a.carry_state(wide, StateCarry::grow());
    for (auto name : a.moment_names()) {
        const auto& m = a.state_of(wide)->moment(name);
        REQUIRE(m.cols() == 5);
        CHECK(m.leftCols(3) == before.moment(name));
        CHECK(m.rightCols(2).isZero());
    }
    wide.grad.setOnes();
    a.step();
    CHECK(wide.value.col(5) == value.col(5));
    CHECK(wide.value.col(4) != value.col(4));
}

}  // namespace

TEST_CASE("SGD with momentum updates only the active columns", "[optim][capacity]") {
    check_matches_compact<Sgd<double>>(SgdOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01});
}

TEST_CASE("Adam updates only the active columns", "[optim][capacity]") {
    check_matches_compact<Adam<double>>(AdamOptions{.lr = 0.01, .weight_decay = 0.01});
}

TEST_CASE("AdamW updates only the active columns, weight decay included", "[optim][capacity]") {
    check_matches_compact<AdamW<double>>(AdamOptions{.lr = 0.01, .weight_decay = 0.1});
}

}  // namespace test_active_columns
