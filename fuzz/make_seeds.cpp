// Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ with the library's
// own writers: bash scripts/fuzz.sh --make-seeds. The files are small and committed; the
// fuzzers start from them (a checkpoint to mutate reaches much more of load_checkpoint than
// random bytes do).
#include <lowrank/data/bpe.hpp>
#include <lowrank/data/tokens.hpp>
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/optim/adam.hpp>

#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace lowrank;

namespace {

fs::path root;

void write(const std::string& target, const std::string& name, const std::string& bytes) {
    const fs::path dir = root / target;
    fs::create_directories(dir);
    std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw Error("make_seeds: cannot write " + (dir / name).string());
}

std::string read(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::string gzip(const std::string& bytes) {
    uLongf size = compressBound(static_cast<uLong>(bytes.size())) + 32;
    std::string out(size, '\0');
    z_stream z{};
    deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);  // +16: a gzip wrapper
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
    z.avail_in = static_cast<uInt>(bytes.size());
    z.next_out = reinterpret_cast<Bytef*>(out.data());
    z.avail_out = static_cast<uInt>(out.size());
    deflate(&z, Z_FINISH);
    out.resize(z.total_out);
    deflateEnd(&z);
    return out;
}

std::string idx(const std::vector<std::uint32_t>& dims) {
    std::string out{'\0', '\0', '\x08', static_cast<char>(dims.size())};
    std::uint64_t count = 1;
    for (std::uint32_t d : dims) {
        for (int s = 24; s >= 0; s -= 8) out += static_cast<char>((d >> s) & 0xFF);
        count *= d;
    }
    for (std::uint64_t i = 0; i < count; ++i) out += static_cast<char>(i * 37 % 251);
    return out;
}

/// The model of fuzz_checkpoint.cpp.
struct SmallModel {
    Parameter<double> weight{"fc.weight", Matrix<double>::Constant(2, 3, 0.5)};
    Parameter<double> bias{"fc.bias", Matrix<double>::Zero(1, 2)};
    AdamW<double> opt{{&weight, &bias}, AdamOptions{.lr = 0.01, .weight_decay = 0.1}};
    ParameterList<double> params() { return {&weight, &bias}; }
    void step() {
        for (Parameter<double>* p : params()) p->grad = Matrix<double>::Constant(p->rows(), p->cols(), 0.25);
        opt.step();
    }
};

std::string stand_ins(std::string_view bytes) {
    std::string s;
    for (char c : bytes) s += detail::code_point_to_utf8(detail::byte_to_code_point()[static_cast<std::uint8_t>(c)]);
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_seeds <fuzz/corpus>\n");
        return 2;
    }
    root = argv[1];
    const fs::path tmp = fs::temp_directory_path() / "lowrank-make-seeds.safetensors";

    // safetensors: every float dtype the reader converts, a 0-D and an I64 tensor, metadata.
    {
        SafetensorsWriter w;
        w.add("w", Matrix<float>::Constant(2, 3, 1.5f));
        w.add("b", Matrix<double>::Constant(1, 4, -2.0), {4});
        w.add_scalar("s", 3.0f);
        w.set_metadata("format", "pt");
        w.write(tmp.string());
        write("safetensors", "float_tensors.safetensors", read(tmp));
        // F16, BF16 and I64 by hand: the writer stores F32 and F64 only.
        const std::string header =
            R"({"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"g":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},)"
            R"("i":{"dtype":"I64","shape":[1],"data_offsets":[12,20]},"z":{"dtype":"F32","shape":[0,5],"data_offsets":[20,20]},)"
            R"("__metadata__":{"k":"v"}})";
        std::string file(8, '\0');
        for (int i = 0; i < 8; ++i) file[static_cast<std::size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
        file += header;
        file += std::string("\x00\x3c\x00\xbc\x00\x7c\x00\x00\x80\x3f\x00\xc0\x07\x00\x00\x00\x00\x00\x00\x00", 20);
        write("safetensors", "half_and_int.safetensors", file);
        write("safetensors", "empty_header.safetensors", std::string("\x02\0\0\0\0\0\0\0{}", 10));
    }

    // checkpoint: the small model after one step, with and without its optimizer, and with
    // its weight trained in 2 of its 3 columns.
    {
        SmallModel m;
        m.step();
        save_checkpoint<double>(tmp.string(), m.params(), &m.opt, 1, {{"run", {{"seed", 1}}}, {"rng", rng_state_to_json(Rng(7).state())}});
        write("checkpoint", "after_one_step.safetensors", read(tmp));
        save_checkpoint<double>(tmp.string(), m.params(), nullptr, 1, nlohmann::json::object());
        write("checkpoint", "weights_only.safetensors", read(tmp));
        SmallModel narrow;
        narrow.weight.set_active_cols(2);
        narrow.step();
        save_checkpoint<double>(tmp.string(), narrow.params(), &narrow.opt, 1, nlohmann::json::object());
        write("checkpoint", "two_active_columns.safetensors", read(tmp));
    }

    // idx: images and labels, plain and gzip'd.
    write("idx", "images.idx", idx({3, 4, 5}));
    write("idx", "labels.idx", idx({7}));
    write("idx", "images.idx.gz", gzip(idx({3, 4, 5})));
    write("idx", "labels.idx.gz", gzip(idx({7})));

    // bpe_vocab: the 256 bytes, "ab", "abc", "<|endoftext|>" and their two merges.
    {
        nlohmann::ordered_json enc = nlohmann::ordered_json::object();
        int id = 0;
        for (int b = 0; b < 256; ++b) enc[stand_ins(std::string(1, static_cast<char>(b)))] = id++;
        enc[stand_ins("ab")] = id++;
        enc[stand_ins("abc")] = id++;
        enc[stand_ins(" a")] = id++;
        enc["<|endoftext|>"] = id++;
        const std::string merges = "#version: 0.2\n" + stand_ins("a") + " " + stand_ins("b") + "\n" + stand_ins("ab") +
                                   " " + stand_ins("c") + "\n" + stand_ins(" ") + " " + stand_ins("a") + "\n";
        write("bpe_vocab", "tiny.txt", enc.dump() + "\n=====\n" + merges);
        std::string crlf = merges;
        for (std::size_t k = 0; (k = crlf.find('\n', k)) != std::string::npos; k += 2) crlf.insert(k, "\r");
        write("bpe_vocab", "tiny_crlf.txt", enc.dump(1) + "\n=====\n" + crlf);
    }

    // tokens: a short stream and an empty one.
    {
        const fs::path t = fs::temp_directory_path() / "lowrank-make-seeds.bin";
        write_tokens(t, std::vector<std::int32_t>{15496, 995, 11, 50256, 0, 1, 65535, 220, 198, 198});
        write("tokens", "ten.bin", read(t));
        write("tokens", "empty.bin", "");
        fs::remove(t);
    }

    // tokenizer: text of the kinds GPT-2's pattern cuts differently.
    write("tokenizer", "english.txt", "Hello world! It's a test, isn't it? We'll see: 1234 + 5678 = 6912.\n\n  Indented.\t");
    write("tokenizer", "unicode.txt", "na\xc3\xafve caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xd8\xa7\xd9\x84\xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a\xd8\xa9 \xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x92\xbb  \xe2\x80\x83x");
    write("tokenizer", "invalid_utf8.txt", std::string("a\xff\xfe b\xc0\xaf \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82", 22));
    write("tokenizer", "whitespace.txt", std::string(300, ' ') + "x" + std::string(50, '\n') + "<|endoftext|>'S'll");
    fs::remove(tmp);
    return 0;
}
