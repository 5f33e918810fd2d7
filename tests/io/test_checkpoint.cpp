#include <lowrank/autograd/ops_activation.hpp>
#include <lowrank/autograd/ops_loss.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/nn/incremental_rank_linear.hpp>
#include <lowrank/nn/linear.hpp>
#include <lowrank/optim/adam.hpp>
#include <lowrank/optim/sgd.hpp>

#include "../test_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

// A namespace of its own: the module's files may be compiled as one unity translation unit.
namespace test_checkpoint {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using namespace lowrank;

using lowrank::test::TempDir;

template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

template <class T>
Matrix<T> normal_matrix(Index rows, Index cols, Rng& rng) {
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(rng.normal());
    return m;
}

/// Two dense layers, fc1 (3 -> 6) and fc2 (6 -> 2), and an AdamW with two groups (weights
/// with decay, biases without), as a trainer would build them. Not movable: the optimizer
/// points at the layers' parameters.
template <class T>
struct TinyModel {
    explicit TinyModel(std::uint64_t seed, double weight_decay = 0.1)
        : init(seed),
          fc1("fc1", 3, 6, init),
          fc2("fc2", 6, 2, init),
          opt({&fc1.weight, &fc2.weight}, AdamOptions{.lr = 0.05, .weight_decay = weight_decay}) {
        opt.add_group({&fc1.bias, &fc2.bias}, GroupOptions{.weight_decay = 0.0, .name = "no_decay"});
    }
    TinyModel(const TinyModel&) = delete;
    TinyModel& operator=(const TinyModel&) = delete;

    ParameterList<T> parameters() { return {&fc1.weight, &fc1.bias, &fc2.weight, &fc2.bias}; }

    /// One AdamW step on a batch drawn from `data`.
    void step(Rng& data) {
        const Matrix<T> x = normal_matrix<T>(4, 3, data), y = normal_matrix<T>(4, 2, data);
        g.clear();
        const Var<T> out = fc2.forward(g, lowrank::tanh(g, fc1.forward(g, g.input(x))));
        const Var<T> loss = mse(g, out, y);
        opt.zero_grad();
        g.backward(loss);
        opt.step();
    }

    Rng init;
    Linear<T> fc1, fc2;
    AdamW<T> opt;
    Graph<T> g;
};

template <class T>
void check_same_parameters(const ParameterList<T>& a, const ParameterList<T>& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        INFO(a[i]->name());
        CHECK(a[i]->name() == b[i]->name());
        CHECK(same_bits(a[i]->value, b[i]->value));
        CHECK(a[i]->active_cols() == b[i]->active_cols());
    }
}

template <class T>
void check_same_state(const Optimizer<T>& a, const ParameterList<T>& pa, const Optimizer<T>& b,
                      const ParameterList<T>& pb) {
    for (std::size_t i = 0; i < pa.size(); ++i) {
        INFO(pa[i]->name());
        const auto* sa = a.state_of(*pa[i]);
        const auto* sb = b.state_of(*pb[i]);
        REQUIRE((sa == nullptr) == (sb == nullptr));
        if (!sa) continue;
        CHECK(sa->step == sb->step);
        for (auto m : a.moment_names()) CHECK(same_bits(sa->moment(m), sb->moment(m)));
    }
}

/// Copies a safetensors file, letting `edit` change the tensors (name -> matrix and shape)
/// and the metadata; for writing malformed checkpoints.
struct FileCopy {
    struct Tensor {
        std::string name;
        MatrixD value;
        std::vector<std::int64_t> shape;
    };
    std::vector<Tensor> tensors;
    std::map<std::string, std::string> metadata;

    explicit FileCopy(const std::string& path) {
        const SafetensorsReader r(path);
        for (const auto& name : r.names()) tensors.push_back({name, r.matrix<double>(name), r.shape(name)});
        metadata = r.metadata();
    }
    Tensor& at(const std::string& name) {
        for (auto& t : tensors)
            if (t.name == name) return t;
        FAIL("no tensor " << name);
        return tensors.front();
    }
    void write(const std::string& path) const {
        SafetensorsWriter w;
        for (const auto& t : tensors) {
            if (t.shape.empty())
                w.add_scalar(t.name, t.value(0, 0));
            else
                w.add(t.name, t.value, t.shape);
        }
        for (const auto& [k, v] : metadata) w.set_metadata(k, v);
        w.write(path);
    }
};

TEMPLATE_TEST_CASE("a resumed run is bit-identical to an uninterrupted one", "[io][checkpoint]", float, double) {
    using T = TestType;
    TempDir dir;
    const std::string path = dir / "ckpt.safetensors";

    // Uninterrupted run: 5 steps, a checkpoint, 4 more steps.
    TinyModel<T> a(7);
    a.opt.set_lr_scale(0.7);
    Rng data(123);
    for (int i = 0; i < 5; ++i) a.step(data);
    data.normal();  // leave a cached normal deviate in the state
    REQUIRE(data.state().has_spare);
    const nlohmann::json extra = {{"data_rng", rng_state_to_json(data.state())},
                                  {"schedule", {{"position", 5}, {"name", "cosine"}}},
                                  {"config", {{"hidden", 6}, {"ranks", {3, 2}}}}};
    save_checkpoint<T>(path, a.parameters(), &a.opt, 5, extra);
    std::vector<Matrix<T>> at_save;
    for (auto* p : a.parameters()) at_save.push_back(p->value);
    for (int i = 0; i < 4; ++i) a.step(data);

    // Resumed run: a model built from another seed, restored, then the same 4 steps.
    TinyModel<T> b(999);
    REQUIRE_FALSE(same_bits(b.fc1.weight.value, at_save[0]));
    CHECK(read_checkpoint_extra(path) == extra);
    const CheckpointInfo info = load_checkpoint<T>(path, b.parameters(), &b.opt);
    CHECK(info.step == 5);
    CHECK(info.extra == extra);
    for (std::size_t i = 0; i < at_save.size(); ++i) CHECK(same_bits(b.parameters()[i]->value, at_save[i]));
    CHECK(b.opt.lr_scale() == 0.7);
    CHECK(b.opt.num_states() == 4);
    for (auto* p : b.parameters()) CHECK(b.opt.state_of(*p)->step == 5);
    Rng resumed_data;
    resumed_data.set_state(rng_state_from_json(info.extra.at("data_rng")));
    for (int i = 0; i < 4; ++i) b.step(resumed_data);

    check_same_parameters(a.parameters(), b.parameters());
    check_same_state<T>(a.opt, a.parameters(), b.opt, b.parameters());
    CHECK(resumed_data.state() == data.state());
}

TEMPLATE_TEST_CASE("a checkpoint stores weights under their own names, biases 1-D, moments under optimizer.",
                   "[io][checkpoint]", float, double) {
    using T = TestType;
    TempDir dir;
    const std::string path = dir / "ckpt.safetensors";
    TinyModel<T> m(3);
    Rng data(1);
    m.step(data);
    m.step(data);
    save_checkpoint<T>(path, m.parameters(), &m.opt, 2, nlohmann::json::object());

    const SafetensorsReader r(path);
    const std::string dtype = std::is_same_v<T, float> ? "F32" : "F64";
    std::set<std::string> weights, moments;
    for (const auto& name : r.names()) {
        CHECK(r.dtype(name) == dtype);
        (name.starts_with("optimizer.") ? moments : weights).insert(name);
    }
    CHECK(weights == std::set<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"});
    CHECK(r.shape("fc1.weight") == std::vector<std::int64_t>{6, 3});
    CHECK(r.shape("fc1.bias") == std::vector<std::int64_t>{6});
    CHECK(r.shape("optimizer.exp_avg_sq.fc2.bias") == std::vector<std::int64_t>{2});
    CHECK(moments.size() == 8);
    CHECK(same_bits(r.matrix<T>("optimizer.exp_avg.fc1.weight"), m.opt.state_of(m.fc1.weight)->exp_avg));

    const auto doc = nlohmann::json::parse(r.metadata().at("lowrank"));
    CHECK(doc.at("version") == 1);
    CHECK(doc.at("step") == 2);
    CHECK(doc.at("optimizer").at("type") == "AdamW");
    CHECK(doc.at("optimizer").at("steps").at("fc2.bias") == 2);
    CHECK(doc.at("optimizer").at("groups").size() == 2);
    CHECK(doc.at("optimizer").at("groups")[0].at("weight_decay") == 0.1);
    CHECK(doc.at("optimizer").at("groups")[1].at("params") == nlohmann::json::array({"fc1.bias", "fc2.bias"}));
    CHECK(doc.at("parameters")[0].at("active_cols") == 3);
    CHECK(r.metadata().at("format") == "pt");  // what transformers' loaders ask of a file
}

TEST_CASE("a checkpoint written before \"format\": \"pt\" was added still loads", "[io][checkpoint]") {
    TempDir dir;
    const std::string path = dir / "ckpt.safetensors", old = dir / "old.safetensors";
    TinyModel<double> m(3);
    Rng data(1);
    m.step(data);
    save_checkpoint<double>(path, m.parameters(), &m.opt, 1, {{"run", "x"}});

    // The same bytes with "format" taken out of the header, as an older writer wrote them.
    std::ifstream in(path, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    auto header = nlohmann::json::parse(std::string(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n)));
    REQUIRE(header.at("__metadata__").at("format") == "pt");
    header.at("__metadata__").erase("format");
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    {
        std::ofstream out(old, std::ios::binary);
        for (int i = 0; i < 8; ++i) out.put(static_cast<char>(static_cast<std::uint64_t>(text.size()) >> (8 * i)));
        out << text;
        out.write(bytes.data() + 8 + n, static_cast<std::streamsize>(bytes.size() - 8 - n));
    }
    REQUIRE(SafetensorsReader(old).metadata().count("format") == 0);

    CHECK(read_checkpoint_extra(old) == nlohmann::json{{"run", "x"}});
    TinyModel<double> other(4);
    const CheckpointInfo info = load_checkpoint<double>(old, other.parameters(), &other.opt);
    CHECK(info.step == 1);
    CHECK(same_bits(other.fc1.weight.value, m.fc1.weight.value));
    CHECK(load_parameters(SafetensorsReader(old), other.parameters()).ok());
}

TEST_CASE("rng states round-trip exactly through JSON text", "[io][checkpoint]") {
    Rng::State s;
    s.s = {0xffffffffffffffffULL, 0x8000000000000001ULL, 0, 0x0123456789abcdefULL};
    s.has_spare = true;
    for (double spare : {-0.0, std::numeric_limits<double>::denorm_min(), 0.1, -1.2345678901234567e-300,
                         std::bit_cast<double>(std::uint64_t{0x7ff8000000000abcULL})}) {
        s.spare = spare;
        const std::string text = rng_state_to_json(s).dump();
        const Rng::State back = rng_state_from_json(nlohmann::json::parse(text));
        CHECK(back.s == s.s);
        CHECK(back.has_spare);
        CHECK(std::bit_cast<std::uint64_t>(back.spare) == std::bit_cast<std::uint64_t>(spare));
    }
    // A generator restored mid-stream continues the same sequence, cached deviate included.
    Rng a(5);
    a.normal();
    Rng b;
    b.set_state(rng_state_from_json(nlohmann::json::parse(rng_state_to_json(a.state()).dump())));
    for (int i = 0; i < 5; ++i) CHECK(std::bit_cast<std::uint64_t>(a.normal()) == std::bit_cast<std::uint64_t>(b.normal()));

    // Words as unsigned integers are accepted too.
    const auto j = nlohmann::json::parse(
        R"({"s":[18446744073709551615,1,2,3],"has_spare":false,"spare":"0x0"})");
    CHECK(rng_state_from_json(j).s[0] == 0xffffffffffffffffULL);

    CHECK_THROWS_WITH(rng_state_from_json(nlohmann::json::parse(R"({"s":[1,2,3],"has_spare":false,"spare":"0x0"})")),
                      Contains("array of 4 words"));
    CHECK_THROWS_WITH(rng_state_from_json(nlohmann::json::parse(R"({"s":[1,2,3,"0xg"],"has_spare":false,"spare":"0x0"})")),
                      Contains("s[3]") && Contains("\"0xg\""));
    CHECK_THROWS_WITH(rng_state_from_json(nlohmann::json::parse(R"({"s":[1,2,3,-4],"has_spare":false,"spare":"0x0"})")),
                      Contains("s[3]"));
    CHECK_THROWS_WITH(rng_state_from_json(nlohmann::json::parse(R"({"s":[1,2,3,4],"has_spare":false,"spare":0.5})")),
                      Contains("spare"));
    CHECK_THROWS_WITH(rng_state_from_json(nlohmann::json::parse(R"({"s":[1,2,3,4],"spare":"0x0"})")),
                      Contains("missing key 'has_spare'"));
}

TEST_CASE("load_parameters lists missing, unexpected and mis-shaped tensors by name, and changes nothing",
          "[io][checkpoint]") {
    TempDir dir;
    const std::string path = dir / "w.safetensors";
    TinyModel<double> m(3);
    {
        SafetensorsWriter w;
        add_parameters<double>(w, m.parameters());
        w.write(path);
    }
    const SafetensorsReader r(path);

    // fc1.weight fits; fc1.bias has the wrong length; fc2.* are not in the list; extra.weight
    // is not in the file.
    Rng rng(11);
    Parameter<double> w1("fc1.weight", normal_matrix<double>(6, 3, rng));
    Parameter<double> b1("fc1.bias", normal_matrix<double>(1, 5, rng));
    Parameter<double> extra("extra.weight", normal_matrix<double>(2, 2, rng));
    const MatrixD w1_before = w1.value;
    const ParameterList<double> params{&w1, &b1, &extra};
    try {
        load_parameters<double>(r, params);
        FAIL("a strict load with problems did not throw");
    } catch (const Error& e) {
        const std::string msg = e.what();
        CHECK_THAT(msg, Contains(path) && Contains("4 problem(s), nothing was loaded"));
        CHECK_THAT(msg, Contains("missing: parameter 'extra.weight' (expected shape [2, 2])"));
        CHECK_THAT(msg, Contains("unexpected: tensor 'fc2.weight' (shape [2, 6])"));
        CHECK_THAT(msg, Contains("unexpected: tensor 'fc2.bias' (shape [2])"));
        CHECK_THAT(msg, Contains("mis-shaped: parameter 'fc1.bias': expected shape [5], got [6]"));
    }
    CHECK(same_bits(w1.value, w1_before));

    // Non-strict: the report says the same and what fits is loaded.
    const LoadReport report = load_parameters<double>(r, params, LoadOptions{.strict = false});
    CHECK(report.loaded == std::vector<std::string>{"fc1.weight"});
    CHECK(report.missing == std::vector<std::string>{"extra.weight"});
    CHECK(report.unexpected == std::vector<std::string>{"fc2.weight", "fc2.bias"});
    REQUIRE(report.mismatched.size() == 1);
    CHECK(report.mismatched[0].parameter == "fc1.bias");
    CHECK(report.mismatched[0].expected == std::vector<std::int64_t>{5});
    CHECK(report.mismatched[0].actual == std::vector<std::int64_t>{6});
    CHECK(same_bits(w1.value, m.fc1.weight.value));
}

TEST_CASE("load_parameters maps name prefixes, accepts [n] and [1, n] for a row, converts dtypes",
          "[io][checkpoint]") {
    TempDir dir;
    const std::string path = dir / "w.safetensors";
    Rng rng(2);
    const MatrixD w = normal_matrix<double>(3, 2, rng), b = normal_matrix<double>(1, 3, rng);
    {
        SafetensorsWriter writer;
        writer.add("h.0.weight", w);
        writer.add("h.0.bias", b);  // stored 2-D [1, 3]
        writer.write(path);
    }
    const SafetensorsReader r(path);
    Parameter<float> pw("transformer.h.0.weight", MatrixF::Zero(3, 2));
    Parameter<float> pb("transformer.h.0.bias", MatrixF::Zero(1, 3));
    const LoadReport report =
        load_parameters<float>(r, {&pw, &pb}, LoadOptions{.add_prefix = "transformer."});
    CHECK(report.ok());
    CHECK(report.loaded.size() == 2);
    CHECK(pw.value == w.cast<float>());
    CHECK(pb.value == b.cast<float>());

    Parameter<double> sw("0.weight", MatrixD::Zero(3, 2));
    Parameter<double> sb("0.bias", MatrixD::Zero(1, 3));
    load_parameters<double>(r, {&sw, &sb}, LoadOptions{.strip_prefix = "h."});
    CHECK(same_bits(sw.value, w));
    CHECK(same_bits(sb.value, b));

    // Tensors under an ignored prefix are neither loaded nor "unexpected".
    Parameter<double> only_bias("h.0.bias", MatrixD::Zero(1, 3));
    CHECK(load_parameters<double>(r, {&only_bias}, LoadOptions{.ignore_prefixes = {"h.0.w"}}).ok());
    CHECK_THROWS_WITH(load_parameters<double>(r, {&only_bias}), Contains("unexpected: tensor 'h.0.weight'"));

    Parameter<double> dup_a("x", MatrixD::Zero(1, 1)), dup_b("x", MatrixD::Zero(1, 1));
    CHECK_THROWS_WITH(load_parameters<double>(r, {&dup_a, &dup_b}), Contains("two parameters are named 'x'"));
}

TEST_CASE("load_checkpoint refuses a model or optimizer that does not match, changing nothing", "[io][checkpoint]") {
    TempDir dir;
    const std::string path = dir / "ckpt.safetensors";
    TinyModel<double> a(7);
    Rng data(5);
    for (int i = 0; i < 3; ++i) a.step(data);
    save_checkpoint<double>(path, a.parameters(), &a.opt, 3, {{"k", 1}});

    SECTION("missing, unexpected and mis-shaped parameters") {
        Rng rng(1);
        Parameter<double> w1("fc1.weight", normal_matrix<double>(6, 3, rng));
        Parameter<double> b1("fc1.bias", normal_matrix<double>(1, 4, rng));
        Parameter<double> w3("fc3.weight", normal_matrix<double>(2, 2, rng));
        const MatrixD before = w1.value;
        CHECK_THROWS_WITH(load_checkpoint<double>(path, {&w1, &b1, &w3}, nullptr),
                          Contains(path) && Contains("does not fit the model") &&
                              Contains("missing: parameter 'fc3.weight' (expected shape [2, 2])") &&
                              Contains("unexpected: tensor 'fc2.weight' (shape [2, 6])") &&
                              Contains("unexpected: tensor 'fc2.bias'") &&
                              Contains("mis-shaped: parameter 'fc1.bias': expected shape [4], got [6]"));
        CHECK(same_bits(w1.value, before));
    }
    SECTION("another optimizer type") {
        TinyModel<double> b(8);
        const MatrixD before = b.fc1.weight.value;
        Adam<double> adam(b.parameters(), AdamOptions{.lr = 0.05});
        CHECK_THROWS_WITH(load_checkpoint<double>(path, b.parameters(), &adam),
                          Contains("optimizer type mismatch") && Contains("\"AdamW\"") && Contains("\"Adam\""));
        Sgd<double> sgd(b.parameters(), SgdOptions{.lr = 0.1, .momentum = 0.9});
        CHECK_THROWS_WITH(load_checkpoint<double>(path, b.parameters(), &sgd), Contains("\"Sgd\""));
        CHECK(same_bits(b.fc1.weight.value, before));
        CHECK(adam.num_states() == 0);
    }
    SECTION("other groups or hyperparameters") {
        TinyModel<double> b(8, /*weight_decay=*/0.2);
        const MatrixD before = b.fc2.weight.value;
        CHECK_THROWS_WITH(load_checkpoint<double>(path, b.parameters(), &b.opt),
                          Contains("optimizer group 0") && Contains("weight_decay 0.1") &&
                              Contains("weight_decay 0.2"));
        CHECK(same_bits(b.fc2.weight.value, before));
        CHECK(b.opt.num_states() == 0);
        // Deliberately resuming with new hyperparameters.
        CHECK(load_checkpoint<double>(path, b.parameters(), &b.opt, CheckpointLoadOptions{.check_groups = false})
                  .step == 3);
        CHECK(b.opt.num_states() == 4);

        Rng init(1);
        Linear<double> l1("fc1", 3, 6, init), l2("fc2", 6, 2, init);
        const ParameterList<double> ps{&l1.weight, &l1.bias, &l2.weight, &l2.bias};
        AdamW<double> one_group(ps, AdamOptions{.lr = 0.05, .weight_decay = 0.1});
        CHECK_THROWS_WITH(load_checkpoint<double>(path, ps, &one_group),
                          Contains("expected the optimizer to have the saved 2 parameter group(s), got 1"));
    }
    SECTION("an optimizer state of the wrong shape") {
        FileCopy copy(path);
        auto& t = copy.at("optimizer.exp_avg.fc1.weight");
        t.value = MatrixD::Zero(3, 6);
        t.shape = {3, 6};
        const std::string bad = dir / "bad.safetensors";
        copy.write(bad);
        TinyModel<double> b(8);
        const MatrixD before = b.fc1.weight.value;
        CHECK_THROWS_WITH(load_checkpoint<double>(bad, b.parameters(), &b.opt),
                          Contains(bad) && Contains("parameter 'fc1.weight'") &&
                              Contains("optimizer state exp_avg has shape [3, 6], expected [6, 3]"));
        CHECK(same_bits(b.fc1.weight.value, before));
        CHECK(b.opt.num_states() == 0);
    }
    SECTION("a missing optimizer state") {
        FileCopy copy(path);
        copy.tensors.erase(std::find_if(copy.tensors.begin(), copy.tensors.end(),
                                        [](const auto& t) { return t.name == "optimizer.exp_avg_sq.fc2.bias"; }));
        const std::string bad = dir / "bad.safetensors";
        copy.write(bad);
        TinyModel<double> b(8);
        CHECK_THROWS_WITH(load_checkpoint<double>(bad, b.parameters(), &b.opt),
                          Contains("parameter 'fc2.bias'") && Contains("exp_avg_sq is missing"));
    }
    SECTION("a newer format version or no checkpoint document") {
        FileCopy copy(path);
        auto doc = nlohmann::json::parse(copy.metadata.at("lowrank"));
        doc["version"] = 2;
        copy.metadata["lowrank"] = doc.dump();
        const std::string newer = dir / "newer.safetensors";
        copy.write(newer);
        TinyModel<double> b(8);
        CHECK_THROWS_AS(load_checkpoint<double>(newer, b.parameters(), &b.opt), FormatError);
        CHECK_THROWS_WITH(read_checkpoint_extra(newer), Contains(newer) && Contains("format version 2 is not supported"));

        copy.metadata.erase("lowrank");
        const std::string plain = dir / "plain.safetensors";
        copy.write(plain);
        CHECK_THROWS_WITH(load_checkpoint<double>(plain, b.parameters(), &b.opt),
                          Contains("not a lowrank checkpoint"));
        CHECK_THROWS_WITH(read_checkpoint_extra(plain), Contains(plain) && Contains("not a lowrank checkpoint"));
    }
    SECTION("weights only: no optimizer given, or none saved") {
        TinyModel<double> b(8);
        CHECK(load_checkpoint<double>(path, b.parameters(), nullptr).step == 3);
        CHECK(same_bits(b.fc2.weight.value, a.fc2.weight.value));
        CHECK(b.opt.num_states() == 0);

        const std::string no_opt = dir / "no_opt.safetensors";
        save_checkpoint<double>(no_opt, a.parameters(), nullptr, 3, nlohmann::json());
        CHECK(read_checkpoint_extra(no_opt) == nlohmann::json::object());
        CHECK_THROWS_WITH(load_checkpoint<double>(no_opt, b.parameters(), &b.opt),
                          Contains("holds no optimizer state") && Contains("AdamW"));
        // A weights-only checkpoint loads as plain weights too.
        TinyModel<double> c(9);
        CHECK(load_parameters<double>(SafetensorsReader(path), c.parameters()).ok());
        CHECK(same_bits(c.fc1.bias.value, a.fc1.bias.value));
    }
}

TEST_CASE("save_checkpoint refuses state it could not restore", "[io][checkpoint]") {
    TempDir dir;
    TinyModel<double> a(7);
    Rng data(5);
    a.step(data);
    // A parameter the optimizer holds but the list omits would lose its state.
    CHECK_THROWS_WITH(save_checkpoint<double>(dir / "x", {&a.fc1.weight, &a.fc1.bias}, &a.opt, 1, {}),
                      Contains("'fc2.weight'") && Contains("not in the parameter list"));
    CHECK_THROWS_WITH(save_checkpoint<double>(dir / "x", a.parameters(), &a.opt, 1, nlohmann::json::array()),
                      Contains("expected extra to be a JSON object"));
    // A state made for an older layout (a pending carry_state) is not saved as if current.
    a.fc1.weight.bump_layout();
    CHECK_THROWS_WITH(save_checkpoint<double>(dir / "x", a.parameters(), &a.opt, 1, {}),
                      Contains("'fc1.weight'") && Contains("carry_state"));
    CHECK_FALSE(fs::exists(dir / "x"));
}

/// A layer 4 -> 5 with spare capacity (4 columns, some active) and a dense head, with AdamW.
template <class T>
struct GrowingModel {
    GrowingModel(std::uint64_t seed, Index active)
        : init(seed),
          ir(IncrementalRankLinear<T>::from_factors("ir", normal_matrix<T>(5, 4, init), normal_matrix<T>(4, 4, init),
                                                    active)),
          head("head", 5, 2, init),
          opt(parameters(), AdamOptions{.lr = 0.02, .weight_decay = 0.01}) {}
    GrowingModel(const GrowingModel&) = delete;
    GrowingModel& operator=(const GrowingModel&) = delete;

    ParameterList<T> parameters() {
        ParameterList<T> out = ir.parameters();
        out.push_back(&head.weight);
        out.push_back(&head.bias);
        return out;
    }

    void step(Rng& data) {
        const Matrix<T> x = normal_matrix<T>(6, 4, data), y = normal_matrix<T>(6, 2, data);
        g.clear();
        const Var<T> out = head.forward(g, lowrank::tanh(g, ir.forward(g, g.input(x))));
        const Var<T> loss = mse(g, out, y);
        opt.zero_grad();
        g.backward(loss);
        opt.step();
    }

    Rng init;
    IncrementalRankLinear<T> ir;
    Linear<T> head;
    AdamW<T> opt;
    Graph<T> g;
};

TEMPLATE_TEST_CASE("an IncrementalRankLinear with active columns round-trips and resumes exactly",
                   "[io][checkpoint]", float, double) {
    using T = TestType;
    TempDir dir;
    const std::string path = dir / "ir.safetensors";
    GrowingModel<T> a(4, 2);
    Rng data(8);
    for (int i = 0; i < 3; ++i) a.step(data);
    a.ir.grow(3);
    a.opt.carry_state(a.ir.U, StateCarry::grow());
    a.opt.carry_state(a.ir.V, StateCarry::grow());
    for (int i = 0; i < 2; ++i) a.step(data);
    save_checkpoint<T>(path, a.parameters(), &a.opt, 5, {{"data_rng", rng_state_to_json(data.state())}});
    for (int i = 0; i < 3; ++i) a.step(data);

    {
        const SafetensorsReader r(path);
        CHECK(r.shape("ir.U") == std::vector<std::int64_t>{5, 4});  // the whole capacity
        CHECK(r.shape("optimizer.exp_avg.ir.U") == std::vector<std::int64_t>{5, 3});  // rows x active_cols
        CHECK(nlohmann::json::parse(r.metadata().at("lowrank.active_cols")) ==
              nlohmann::json{{"ir.U", 3}, {"ir.V", 3}});
    }

    // Built with one active column: the load must set 3 before installing the (5 x 3) state.
    GrowingModel<T> b(77, 1);
    const CheckpointInfo info = load_checkpoint<T>(path, b.parameters(), &b.opt);
    CHECK(b.ir.rank() == 3);
    CHECK(b.opt.state_of(b.ir.U)->cols == 3);
    Rng resumed;
    resumed.set_state(rng_state_from_json(info.extra.at("data_rng")));
    for (int i = 0; i < 3; ++i) b.step(resumed);
    check_same_parameters(a.parameters(), b.parameters());
    check_same_state<T>(a.opt, a.parameters(), b.opt, b.parameters());

    // Weights alone carry the active columns too.
    const std::string weights = dir / "weights.safetensors";
    SafetensorsWriter w;
    add_parameters<T>(w, a.parameters());
    w.write(weights);
    GrowingModel<T> c(5, 1);
    CHECK(load_parameters<T>(SafetensorsReader(weights), c.parameters()).ok());
    CHECK(c.ir.rank() == 3);
    CHECK(same_bits(c.ir.U.value, a.ir.U.value));
    GrowingModel<T> d(5, 1);
    load_parameters<T>(SafetensorsReader(weights), d.parameters(), LoadOptions{.restore_active_cols = false});
    CHECK(d.ir.rank() == 1);
}

}  // namespace test_checkpoint
